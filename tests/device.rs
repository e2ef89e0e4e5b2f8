//! Device probing, the kernel table, tensors' typed errors, and the self-check on each device.

use reclmis::device::{Device, DeviceChoice};
use reclmis::kernels::{Kernel, MODULES, NVRTC_AT_BUILD, RESOURCES};
use reclmis::{selfcheck, Tensor};

#[test]
fn auto_never_fails_and_cuda_probe_does_not_panic() {
    let d = Device::from_choice(DeviceChoice::Auto).unwrap();
    match Device::cuda(0) {
        Ok(_) => assert_eq!(d.kind(), reclmis::DeviceKind::Cuda),
        Err(e) => {
            assert_eq!(d.kind(), reclmis::DeviceKind::Cpu);
            assert!(e.to_string().starts_with("no usable CUDA device"), "{e}");
        }
    }
}

#[test]
fn every_kernel_is_in_a_module_with_source() {
    for &k in Kernel::ALL {
        let m = &MODULES[k.module()];
        assert!(m.source.contains(k.name()), "{} not in kernels/{}.cu", k.name(), m.name);
    }
}

/// CI builds with RECLMIS_REQUIRE_NVRTC=1: there every kernel must have been compiled for both
/// architectures with its ptxas figures, and the images must be embedded.
#[test]
fn kernels_were_compiled_by_nvrtc_when_required() {
    if std::env::var("RECLMIS_REQUIRE_NVRTC").as_deref() != Ok("1") {
        return;
    }
    assert!(NVRTC_AT_BUILD.is_some(), "built without NVRTC");
    for &k in Kernel::ALL {
        for arch in [80, 90] {
            let r = RESOURCES.iter().find(|r| r.kernel == k.name() && r.arch == arch);
            assert!(r.is_some_and(|r| r.registers > 0), "{} has no sm_{arch} resource figures", k.name());
        }
    }
    for m in MODULES {
        assert!(!m.ptx.is_empty() && m.cubins.iter().all(|(_, c)| !c.is_empty()), "{} not embedded", m.name);
    }
}

#[test]
fn tensor_errors_are_typed() {
    let e = Tensor::from_vec(vec![1.0; 5], &[2, 3], &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("5 values do not fill shape [2, 3]"), "{e}");
    let t = Tensor::from_vec(vec![1.0; 6], &[2, 3], &Device::Cpu).unwrap();
    assert!(t.reshape(&[4]).unwrap_err().to_string().contains("changes the size"));
    assert!(t.to_vec_i32().unwrap_err().to_string().contains("expected dtype I32"));
}

#[test]
fn host_device_round_trip() {
    let v: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let t = Tensor::from_vec(v.clone(), &[10, 100], &Device::Cpu).unwrap();
    let e = t.to_device(&Device::emu().unwrap()).unwrap();
    assert_eq!(e.to_vec().unwrap(), v);
    assert_eq!(e.to_device(&Device::Cpu).unwrap().to_vec().unwrap(), v);
}

#[test]
fn selfcheck_passes_on_cpu_and_emu() {
    for dev in [Device::Cpu, Device::emu().unwrap()] {
        let r = selfcheck::run(&dev).unwrap();
        assert!(r.ok, "{}", r.text);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_loads_every_kernel_and_passes_selfcheck() {
    let dev = Device::cuda(0).expect("a CUDA GPU");
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &dev {
        d.load_all().unwrap();
    }
    let v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    let t = Tensor::from_vec(v.clone(), &[1000], &dev).unwrap();
    assert_eq!(t.to_vec().unwrap(), v);
    let r = selfcheck::run(&dev).unwrap();
    assert!(r.ok, "{}", r.text);
}
