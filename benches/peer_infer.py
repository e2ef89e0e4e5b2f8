"""The PyTorch peer of `reclmis-infer` (BENCHMARKS.md, "reclmis-infer"): one image and its note
to a mask PNG with the official computation (`../shared/peer/reclmis_torch.py`), from the same
inference checkpoint, done the way a careful PyTorch deployment does it:

- the model is built on the meta device (no random initialisation of its 220M parameters) and
  the checkpoint's tensors are assigned to it from the memory-mapped safetensors file
  (`load_file` + `load_state_dict(assign=True)`): nothing is copied that need not be;
- the note is tokenized by Hugging Face `tokenizers` with the tokenizer.json embedded in the
  checkpoint, cut or padded to the model's 18 tokens as reclmis does (the last id kept);
- the image is read with Pillow, the mask thresholded at 0.5 and written as a 0/255 PNG;
- `torch.inference_mode()`, 2 threads (the machine's cores).

usage: python peer_infer.py PEER_DIR CHECKPOINT IMAGE NOTE OUT_PNG [--plain]
  --plain builds the model on the cpu first (PyTorch's default initialisation), as most
          deployment code does, and copies the weights in (`load_state_dict`).
Prints its phase times (seconds since the interpreter started) on stderr; time the whole process
with /usr/bin/time. A peer, not a dependency: needs torch, safetensors, tokenizers and pillow in
a virtual environment outside the repository.
"""
import sys
import time

T0 = time.perf_counter()


def mark(what):
    print(f"{time.perf_counter() - T0:8.3f} s  {what}", file=sys.stderr)


def main():
    peer_dir, checkpoint, image, note, out = sys.argv[1:6]
    plain = "--plain" in sys.argv[6:]
    import json
    import os

    import numpy as np
    import torch
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    sys.path.insert(0, peer_dir)
    import reclmis_torch as R

    torch.set_num_threads(2)
    if os.path.exists(out):
        raise SystemExit(f"{out} exists")
    mark("imported")
    with safe_open(checkpoint, "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["config"])
    tok = Tokenizer.from_str(meta["tokenizer.json"])
    mark("metadata and tokenizer")
    if plain:
        model = R.build(cfg["name"])
        missing, _ = model.load_state_dict(load_file(checkpoint), strict=False)
    else:
        with torch.device("meta"):
            model = R.build(cfg["name"])
        missing, _ = model.load_state_dict(load_file(checkpoint), strict=False, assign=True)
    model.eval()
    mark(f"weights ({'plain' if plain else 'meta + assign'}; {len(missing)} training-only tensors not in the file)")
    length = cfg["token_len"]
    ids = tok.encode(note).ids
    if len(ids) > length:
        ids = ids[: length - 1] + [ids[-1]]
    ids = ids + [0] * (length - len(ids))
    ids_t = torch.tensor([ids])
    valid = (ids_t != 0).long()
    img = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32) / 255.0
    h, w = cfg["img_size"]
    if img.shape[:2] != (h, w):
        raise SystemExit(f"the peer takes {h}x{w} images; {image} is {img.shape[1]}x{img.shape[0]}")
    x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).contiguous()
    with torch.inference_mode():
        probs = R.inference_forward(model, x, ids_t, valid)[0, 0]
    mark("segmented")
    mask = ((probs * 255.0).round() > 127).to(torch.uint8).numpy() * 255
    Image.fromarray(mask).save(out)
    mark(f"{out} written")


if __name__ == "__main__":
    main()
