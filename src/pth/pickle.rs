//! A pickle reader for what `torch.save` writes: plain containers, numbers, strings, and tensors
//! rebuilt from persistent storage ids. It interprets opcodes; it never imports or calls anything.
//! A global it does not know (numpy scalars, custom classes) becomes an inert `Opaque` value, so a
//! checkpoint with extra Python objects beside its `state_dict` still reads, while a tensor is only
//! ever built from the whitelisted `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`.
//!
//! Values live in an arena and refer to each other by index: pickle's memo shares objects (and
//! later opcodes mutate shared lists and dicts), and a flat arena keeps that exact, makes sharing
//! O(1) (no exponential copies), and frees everything without recursion however deep the nesting.

use std::fmt;

/// The element types of torch storages (`torch.FloatStorage`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDtype {
    fn from_class(name: &str) -> Option<StorageDtype> {
        Some(match name {
            "DoubleStorage" => StorageDtype::F64,
            "FloatStorage" => StorageDtype::F32,
            "HalfStorage" => StorageDtype::F16,
            "BFloat16Storage" => StorageDtype::BF16,
            "LongStorage" => StorageDtype::I64,
            "IntStorage" => StorageDtype::I32,
            "ShortStorage" => StorageDtype::I16,
            "CharStorage" => StorageDtype::I8,
            "ByteStorage" => StorageDtype::U8,
            "BoolStorage" => StorageDtype::Bool,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            StorageDtype::F64 | StorageDtype::I64 => 8,
            StorageDtype::F32 | StorageDtype::I32 => 4,
            StorageDtype::F16 | StorageDtype::BF16 | StorageDtype::I16 => 2,
            StorageDtype::I8 | StorageDtype::U8 | StorageDtype::Bool => 1,
        }
    }
}

/// A tensor as the pickle describes it: a view (offset, size, stride, in elements) of a storage
/// kept in the archive as `data/<key>`.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub key: String,
    pub dtype: StorageDtype,
    /// Elements in the storage, as the pickle states it (checked against the file by the caller).
    pub storage_len: usize,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

pub type Id = usize;

#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too wide for i64 (LONG1/LONG4 with more than 8 bytes); its byte count.
    BigInt(usize),
    Float(f64),
    Str(String),
    Bytes(usize),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global {
        module: String,
        name: String,
    },
    Storage {
        dtype: StorageDtype,
        key: String,
        len: usize,
    },
    Tensor(TensorRef),
    /// Anything this reader does not interpret (an unknown global, the result of calling one).
    Opaque(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickleError {
    pub at: usize,
    pub detail: String,
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pickle byte {}: {}", self.at, self.detail)
    }
}

pub struct Pickle {
    pub values: Vec<Value>,
    pub root: Id,
}

impl Pickle {
    pub fn get(&self, id: Id) -> &Value {
        &self.values[id]
    }

    /// The string a value holds, if it is one.
    pub fn str(&self, id: Id) -> Option<&str> {
        match &self.values[id] {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

enum Slot {
    Mark,
    Val(Id),
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    op_at: usize,
    values: Vec<Value>,
    stack: Vec<Slot>,
    memo: std::collections::HashMap<u64, Id>,
}

type R<T> = std::result::Result<T, PickleError>;

/// Values, memo entries and stack slots each cost a few dozen bytes, at most one per opcode; the
/// cap keeps a hostile pickle's memory to a few hundred MB. (The official tiny checkpoint, with
/// its optimiser state, holds about 36,000 opcodes; a full-size one about as many.)
const MAX_VALUES: usize = 4_000_000;

impl<'a> Vm<'a> {
    fn fail<T>(&self, detail: impl Into<String>) -> R<T> {
        Err(PickleError { at: self.op_at, detail: detail.into() })
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.data.len() => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => self.fail(format!("truncated: {n} bytes needed, {} left", self.data.len() - self.pos)),
        }
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn line(&mut self) -> R<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return self.fail("truncated: a text argument has no newline");
        };
        let s = std::str::from_utf8(&rest[..n]).or_else(|_| self.fail("a text argument is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn utf8(&mut self, n: usize) -> R<String> {
        let b = self.take(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => self.fail("a string is not UTF-8"),
        }
    }

    fn push(&mut self, v: Value) -> R<()> {
        if self.values.len() >= MAX_VALUES {
            return self.fail("too many values");
        }
        self.values.push(v);
        self.stack.push(Slot::Val(self.values.len() - 1));
        Ok(())
    }

    fn pop(&mut self) -> R<Id> {
        match self.stack.pop() {
            Some(Slot::Val(id)) => Ok(id),
            Some(Slot::Mark) => self.fail("a mark where a value was expected"),
            None => self.fail("stack underflow"),
        }
    }

    fn top(&self) -> R<Id> {
        match self.stack.last() {
            Some(Slot::Val(id)) => Ok(*id),
            _ => self.fail("no value on the stack"),
        }
    }

    /// The values above the topmost mark (the mark removed).
    fn pop_mark(&mut self) -> R<Vec<Id>> {
        let Some(m) = self.stack.iter().rposition(|s| matches!(s, Slot::Mark)) else {
            return self.fail("no mark on the stack");
        };
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|s| if let Slot::Val(id) = s { id } else { unreachable!("after the last mark") })
            .collect())
    }

    fn memo_put(&mut self, key: u64) -> R<()> {
        let id = self.top()?;
        if self.memo.len() >= MAX_VALUES {
            return self.fail("memo too large");
        }
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> R<()> {
        match self.memo.get(&key) {
            Some(&id) => {
                self.stack.push(Slot::Val(id));
                Ok(())
            }
            None => self.fail(format!("memo key {key} was never stored")),
        }
    }

    fn append(&mut self, list: Id, items: Vec<Id>) -> R<()> {
        match &mut self.values[list] {
            Value::List(v) => {
                v.extend(items);
                Ok(())
            }
            // appending to something we do not interpret leaves it inert
            Value::Opaque(_) => Ok(()),
            _ => self.fail("APPEND to a value that is not a list"),
        }
    }

    fn set_items(&mut self, dict: Id, items: Vec<Id>) -> R<()> {
        if !items.len().is_multiple_of(2) {
            return self.fail("SETITEMS with an odd number of values");
        }
        match &mut self.values[dict] {
            Value::Dict(v) => {
                v.extend(items.chunks_exact(2).map(|c| (c[0], c[1])));
                Ok(())
            }
            Value::Opaque(_) => Ok(()),
            _ => self.fail("SETITEM on a value that is not a dict"),
        }
    }

    fn global(&mut self, module: String, name: String) -> R<()> {
        self.push(Value::Global { module, name })
    }

    /// REDUCE / NEWOBJ: only the calls torch.save emits for containers and tensors mean anything.
    fn call(&mut self, callable: Id, args: Id) -> R<()> {
        let (module, name) = match &self.values[callable] {
            Value::Global { module, name } => (module.clone(), name.clone()),
            _ => return self.push(Value::Opaque("a call of a non-global".into())),
        };
        let args: Vec<Id> = match &self.values[args] {
            Value::Tuple(a) => a.clone(),
            _ => return self.fail(format!("{module}.{name} called with arguments that are not a tuple")),
        };
        let v = match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") | ("builtins", "dict") if args.is_empty() => Value::Dict(vec![]),
            ("torch._utils", "_rebuild_tensor_v2") => Value::Tensor(self.rebuild_tensor(&args)?),
            ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
                match args.first().map(|&a| &self.values[a]) {
                    Some(Value::Tensor(t)) => Value::Tensor(t.clone()),
                    _ => return self.fail("_rebuild_parameter without a tensor"),
                }
            }
            _ => Value::Opaque(format!("{module}.{name}(...)")),
        };
        self.push(v)
    }

    fn int_arg(&self, id: Id, what: &str) -> R<usize> {
        match self.values[id] {
            Value::Int(i) if i >= 0 => Ok(i as usize),
            _ => self.fail(format!("tensor {what} is not a non-negative integer")),
        }
    }

    fn ints(&self, id: Id, what: &str) -> R<Vec<usize>> {
        match &self.values[id] {
            Value::Tuple(v) => v.iter().map(|&i| self.int_arg(i, what)).collect(),
            _ => self.fail(format!("tensor {what} is not a tuple")),
        }
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`
    fn rebuild_tensor(&self, a: &[Id]) -> R<TensorRef> {
        if a.len() < 4 {
            return self.fail(format!("_rebuild_tensor_v2 with {} arguments", a.len()));
        }
        let (dtype, key, len) = match &self.values[a[0]] {
            Value::Storage { dtype, key, len } => (*dtype, key.clone(), *len),
            _ => return self.fail("_rebuild_tensor_v2 without a storage"),
        };
        let offset = self.int_arg(a[1], "offset")?;
        let size = self.ints(a[2], "size")?;
        let stride = self.ints(a[3], "stride")?;
        if size.len() != stride.len() {
            return self.fail(format!("tensor size {size:?} and stride {stride:?} differ in rank"));
        }
        Ok(TensorRef { key, dtype, storage_len: len, offset, size, stride })
    }

    /// BINPERSID: torch's `('storage', <storage class>, key, location, numel)`.
    fn persistent(&mut self, pid: Id) -> R<()> {
        let parts = match &self.values[pid] {
            Value::Tuple(p) => p.clone(),
            _ => return self.fail("a persistent id that is not a tuple"),
        };
        let is = |i: usize, f: &dyn Fn(&Value) -> bool| parts.get(i).is_some_and(|&p| f(&self.values[p]));
        if parts.len() != 5 || !is(0, &|v| matches!(v, Value::Str(s) if s == "storage")) {
            return self.fail("a persistent id that is not a torch storage");
        }
        let dtype = match &self.values[parts[1]] {
            Value::Global { module, name } if module == "torch" => StorageDtype::from_class(name),
            _ => None,
        };
        let Some(dtype) = dtype else {
            return self.fail("a storage of an unknown type");
        };
        let key = match &self.values[parts[2]] {
            Value::Str(k) if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => k.clone(),
            _ => return self.fail("a storage key that is not a plain name"),
        };
        let len = self.int_arg(parts[4], "storage length")?;
        self.push(Value::Storage { dtype, key, len })
    }

    fn run(mut self) -> R<Pickle> {
        loop {
            self.op_at = self.pos;
            if self.stack.len() > MAX_VALUES {
                return self.fail("the stack grew past its limit");
            }
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return self.fail(format!("pickle protocol {p} (at most 5 is known)"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint
                }
                b'.' => {
                    let root = self.pop()?;
                    return Ok(Pickle { values: self.values, root });
                }
                b'(' => self.stack.push(Slot::Mark),
                b'0' => {
                    self.stack.pop().map_or_else(|| self.fail("POP on an empty stack"), |_| Ok(()))?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?;
                    self.stack.push(Slot::Val(t));
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push(Value::Int(v))?
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(Value::Int(v))?
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.push(Value::Int(v))?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8()? as usize } else { self.u32()? as usize };
                    let b = self.take(n)?;
                    let v = if n <= 8 {
                        let mut x = [if b.last().is_some_and(|&l| l & 0x80 != 0) { 0xff } else { 0 }; 8];
                        x[..n].copy_from_slice(b);
                        Value::Int(i64::from_le_bytes(x))
                    } else {
                        Value::BigInt(n)
                    };
                    self.push(v)?
                }
                b'I' | b'L' => {
                    let s = self.line()?.trim_end_matches('L');
                    let v = match s {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => match s.parse::<i64>() {
                            Ok(i) => Value::Int(i),
                            Err(_) => return self.fail(format!("bad integer {s:?}")),
                        },
                    };
                    self.push(v)?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    self.push(Value::Float(v))?
                }
                b'F' => {
                    let s = self.line()?;
                    let v = s.parse::<f64>().or_else(|_| self.fail(format!("bad float {s:?}")))?;
                    self.push(Value::Float(v))?
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as usize,
                        0x8c => self.u8()? as usize,
                        _ => usize::try_from(self.u64()?).unwrap_or(usize::MAX),
                    };
                    let s = self.utf8(n)?;
                    self.push(Value::Str(s))?
                }
                b'T' | b'U' => {
                    // BINSTRING / SHORT_BINSTRING (protocol 1 byte strings): kept when UTF-8
                    let n = if op == b'T' { self.u32()? as usize } else { self.u8()? as usize };
                    let b = self.take(n)?;
                    let v = std::str::from_utf8(b).map_or(Value::Bytes(n), |s| Value::Str(s.to_string()));
                    self.push(v)?
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => usize::try_from(self.u64()?).unwrap_or(usize::MAX),
                    };
                    self.take(n)?;
                    self.push(Value::Bytes(n))?
                }
                b'}' => self.push(Value::Dict(vec![]))?,
                b']' => self.push(Value::List(vec![]))?,
                b')' => self.push(Value::Tuple(vec![]))?,
                0x8f => self.push(Value::Opaque("set".into()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    if !items.len().is_multiple_of(2) {
                        return self.fail("DICT with an odd number of values");
                    }
                    self.push(Value::Dict(items.chunks_exact(2).map(|c| (c[0], c[1])).collect()))?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items))?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(items))?
                }
                0x91 => {
                    self.pop_mark()?;
                    self.push(Value::Opaque("frozenset".into()))?
                }
                0x90 => {
                    self.pop_mark()?; // ADDITEMS into a set we do not interpret
                    self.top()?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let list = self.top()?;
                    self.append(list, vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.append(list, items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.set_items(d, vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top()?;
                    self.set_items(d, items)?
                }
                b'q' => {
                    let k = self.u8()? as u64;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.u32()? as u64;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?
                }
                b'p' => {
                    let s = self.line()?;
                    let k = s.parse::<u64>().or_else(|_| self.fail(format!("bad memo key {s:?}")))?;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u64;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = self.u32()? as u64;
                    self.memo_get(k)?
                }
                b'g' => {
                    let s = self.line()?;
                    let k = s.parse::<u64>().or_else(|_| self.fail(format!("bad memo key {s:?}")))?;
                    self.memo_get(k)?
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.global(module, name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&self.values[module], &self.values[name]) {
                        (Value::Str(m), Value::Str(n)) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(m, n)?
                        }
                        _ => return self.fail("STACK_GLOBAL without two strings"),
                    }
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.call(callable, args)?
                }
                0x92 => {
                    self.pop()?; // kwargs
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.call(callable, args)?
                }
                b'b' => {
                    // BUILD: state for an object; plain containers and tensors need none
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.persistent(pid)?
                }
                other => return self.fail(format!("opcode 0x{other:02x} is not supported")),
            }
        }
    }
}

/// Reads one pickle. Never executes anything it names.
pub fn read(data: &[u8]) -> Result<Pickle, PickleError> {
    let vm =
        Vm { data, pos: 0, op_at: 0, values: Vec::new(), stack: Vec::new(), memo: std::collections::HashMap::new() };
    vm.run()
}
