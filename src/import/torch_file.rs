//! `torch.save` files read as plain data, never as code.
//!
//! A `torch.save` file is a zip archive: `<dir>/data.pkl` (a pickle, protocol 2) holds the
//! object, and every tensor's bytes lie in `<dir>/data/<key>`. Unpickling in Python can call any
//! global the pickle names; here candle-core's pickle machine (`candle_core::pickle::Stack`) only
//! builds a tree of opcodes' results and calls nothing. Before that tree is built, [`prescan`]
//! runs the same stack discipline over the bytes with only each value's depth and size, so that a
//! hostile pickle is refused (with the offending global named) before it can exhaust memory or the
//! stack: every global must be one of [`ALLOWED_GLOBALS`], and nesting, memo copies and string
//! lengths are bounded. The tree is then turned into [`Value`]s: dicts, lists, tuples, numbers,
//! strings and tensors; a tensor is read from its storage entry with its shape, strides and
//! offset checked against the entry's size.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::rc::Rc;

use candle_core::pickle::{Object, Stack};

/// The globals a `torch.save` of plain data names: tensors are rebuilt by
/// `torch._utils._rebuild_tensor_v2` from a storage class, and their empty backward-hook dict is an
/// `OrderedDict`. Anything else is code a pickle would run, refused by name.
pub const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("torch._utils", "_rebuild_tensor_v2"),
    ("collections", "OrderedDict"),
    ("torch", "IntStorage"),
    ("torch", "LongStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
    ("torch", "FloatStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
];

/// Most nesting of containers accepted (real dumps nest 4 deep: dict, list, dict, tensor).
const MAX_DEPTH: u32 = 64;
/// Most values the tree may hold, memo copies included (each value is a few dozen bytes).
const MAX_NODES: u64 = 20_000_000;
/// Largest `data.pkl` read (the tensors are elsewhere; per-token dumps list token ids here).
const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// Largest tensor storage read.
const MAX_STORAGE_BYTES: u64 = 2 << 30;

/// Element type of a tensor, from its storage class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// `torch.int64`.
    I64,
    /// `torch.int32`.
    I32,
    /// `torch.int16`.
    I16,
    /// `torch.int8`.
    I8,
    /// `torch.uint8`.
    U8,
    /// `torch.bool`.
    Bool,
    /// `torch.float32`.
    F32,
    /// `torch.float64`.
    F64,
    /// `torch.float16`.
    F16,
    /// `torch.bfloat16`.
    BF16,
}

impl DType {
    fn from_storage(class: &str) -> Option<Self> {
        Some(match class {
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            "FloatStorage" => DType::F32,
            "DoubleStorage" => DType::F64,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            DType::I64 | DType::F64 => 8,
            DType::I32 | DType::F32 => 4,
            DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The dtype's name in torch.
    pub fn name(self) -> &'static str {
        match self {
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    fn is_integer(self) -> bool {
        matches!(
            self,
            DType::I64 | DType::I32 | DType::I16 | DType::I8 | DType::U8 | DType::Bool
        )
    }
}

/// A tensor read from the archive, elements in row-major order.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Element type as stored.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Elements, widened (integers exactly; floats are kept apart).
    pub data: TensorData,
}

/// Elements of a [`Tensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// Integer and bool tensors.
    Int(Vec<i64>),
    /// Floating-point tensors.
    Float(Vec<f64>),
}

impl Tensor {
    /// The elements as integers, or an error naming the dtype when they are floating point.
    pub fn ints(&self) -> Result<&[i64], String> {
        match &self.data {
            TensorData::Int(v) => Ok(v),
            TensorData::Float(_) => Err(format!(
                "holds {} values, expected integers",
                self.dtype.name()
            )),
        }
    }
}

/// Plain data read from a pickle.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// A list or a tuple.
    List(Vec<Value>),
    /// A dict, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A tensor.
    Tensor(Tensor),
}

impl Value {
    /// What the value is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Tensor(_) => "a tensor",
        }
    }

    /// The entry `key` of a dict with string keys.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string keys of a dict (others skipped), for messages.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Value::Dict(items) => items
                .iter()
                .filter_map(|(k, _)| match k {
                    Value::Str(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Reads a `torch.save` archive from its bytes: the object in its `data.pkl`, as plain data.
pub fn read(bytes: &[u8]) -> Result<Value, String> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format!("not a torch.save archive (zip): {e}"))?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();
    let pkl = names
        .iter()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .ok_or_else(|| "a zip archive without a data.pkl: not a torch.save file".to_string())?
        .clone();
    let dir = pkl.strip_suffix("data.pkl").unwrap_or("").to_string();
    if let Some(order) = names.iter().find(|n| **n == format!("{dir}byteorder")) {
        let order = read_entry(&mut zip, &order.clone(), 16)?;
        if order != b"little" {
            return Err(format!(
                "tensors stored {} (only little-endian archives are read)",
                String::from_utf8_lossy(&order)
            ));
        }
    }
    let pickle = read_entry(&mut zip, &pkl, MAX_PICKLE_BYTES)?;
    let mut cache: HashMap<String, Rc<Vec<u8>>> = HashMap::new();
    let mut storage = |key: &str| -> Result<Rc<Vec<u8>>, String> {
        if let Some(b) = cache.get(key) {
            return Ok(b.clone());
        }
        let bytes = Rc::new(read_entry(
            &mut zip,
            &format!("{dir}data/{key}"),
            MAX_STORAGE_BYTES,
        )?);
        cache.insert(key.to_string(), bytes.clone());
        Ok(bytes)
    };
    decode_pickle(&pickle, &mut storage).map_err(|e| format!("{pkl}: {e}"))
}

/// A tensor storage's bytes by key (`data/<key>` in the archive).
pub type StorageLookup<'a> = dyn FnMut(&str) -> Result<Rc<Vec<u8>>, String> + 'a;

/// Decodes a `data.pkl` as plain data: [`prescan`], then candle's pickle machine, then the tree
/// into [`Value`]s, tensors read through `storage`. The fuzzer's entry point.
pub fn decode_pickle(pickle: &[u8], storage: &mut StorageLookup) -> Result<Value, String> {
    prescan(pickle)?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut Cursor::new(pickle))
        .map_err(|e| e.to_string())?;
    let object = stack.finalize().map_err(|e| e.to_string())?;
    convert(object, storage, 0)
}

fn read_entry(
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
    max: u64,
) -> Result<Vec<u8>, String> {
    let entry = zip
        .by_name(name)
        .map_err(|e| format!("archive entry {name}: {e}"))?;
    if entry.size() > max {
        return Err(format!(
            "archive entry {name} holds {} bytes, more than the {max} read",
            entry.size()
        ));
    }
    let mut out = Vec::with_capacity(entry.size() as usize);
    entry
        .take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("archive entry {name}: {e}"))?;
    if out.len() as u64 > max {
        return Err(format!("archive entry {name} is larger than {max} bytes"));
    }
    Ok(out)
}

/// One value on the pre-scan's stack: how deep it nests and how many values it holds.
#[derive(Clone, Copy)]
struct Shadow {
    depth: u32,
    nodes: u64,
    mark: bool,
}

const LEAF: Shadow = Shadow {
    depth: 1,
    nodes: 1,
    mark: false,
};

/// Runs the pickle's opcodes with only the depth and size of each value, and refuses a global
/// that is not plain data, a nesting past [`MAX_DEPTH`], more than [`MAX_NODES`] values in all
/// (memo copies count: candle clones a value for every memo read), a length that runs past the
/// end, and an opcode the reader does not know.
pub fn prescan(pickle: &[u8]) -> Result<(), String> {
    let mut r = Cursor::new(pickle);
    let mut stack: Vec<Shadow> = Vec::new();
    let mut memo: HashMap<u32, Shadow> = HashMap::new();
    let mut total: u64 = 0;
    let at = |r: &Cursor<&[u8]>| r.position().saturating_sub(1);
    loop {
        let op = read_u8(&mut r).map_err(|_| "pickle ends before its STOP opcode".to_string())?;
        let pos = at(&r);
        let push = |stack: &mut Vec<Shadow>, s: Shadow, total: &mut u64| {
            *total += s.nodes;
            stack.push(s);
        };
        match op {
            0x80 => {
                read_bytes(&mut r, 1)?;
            }
            b'c' => {
                let module = read_line(&mut r)?;
                let name = read_line(&mut r)?;
                if !ALLOWED_GLOBALS
                    .iter()
                    .any(|(m, n)| *m == module && *n == name)
                {
                    return Err(format!(
                        "the pickle names the global `{module}.{name}` (at byte {pos}), which is not plain data: only dicts, lists, numbers, strings and tensors are read, and no pickle code is run"
                    ));
                }
                push(&mut stack, LEAF, &mut total);
            }
            b'K' => {
                read_bytes(&mut r, 1)?;
                push(&mut stack, LEAF, &mut total);
            }
            b'M' => {
                read_bytes(&mut r, 2)?;
                push(&mut stack, LEAF, &mut total);
            }
            b'J' => {
                read_bytes(&mut r, 4)?;
                push(&mut stack, LEAF, &mut total);
            }
            b'G' => {
                read_bytes(&mut r, 8)?;
                push(&mut stack, LEAF, &mut total);
            }
            0x8a => {
                let n = read_u8(&mut r)?;
                if n > 8 {
                    return Err(format!(
                        "an integer of {n} bytes at byte {pos} (at most 8 are read)"
                    ));
                }
                read_bytes(&mut r, n as usize)?;
                push(&mut stack, LEAF, &mut total);
            }
            b'X' => {
                let len = u32::from_le_bytes(read_bytes(&mut r, 4)?.try_into().unwrap());
                read_bytes(&mut r, len as usize)?;
                push(&mut stack, LEAF, &mut total);
            }
            b'N' | 0x88 | 0x89 | b')' | b']' | b'}' | b'd' => {
                // `d` (DICT) is read by candle as an empty dict too.
                push(&mut stack, LEAF, &mut total);
            }
            b'(' => push(&mut stack, Shadow { mark: true, ..LEAF }, &mut total),
            b'Q' => {
                let id = pop(&mut stack)?;
                push(&mut stack, wrap(&[id]), &mut total);
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                push(&mut stack, wrap(&items), &mut total);
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(pop(&mut stack)?);
                }
                push(&mut stack, wrap(&items), &mut total);
            }
            b'a' | b's' => {
                let mut items = vec![pop(&mut stack)?];
                if op == b's' {
                    items.push(pop(&mut stack)?);
                }
                let last = last(&mut stack)?;
                grow(last, &items);
                total += items.iter().map(|s| s.nodes).sum::<u64>();
            }
            b'e' | b'u' => {
                let items = pop_mark(&mut stack)?;
                let last = last(&mut stack)?;
                grow(last, &items);
                total += items.iter().map(|s| s.nodes).sum::<u64>();
            }
            b'R' | b'b' | 0x81 => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                push(&mut stack, wrap(&[callable, args]), &mut total);
            }
            b'h' | b'j' => {
                let id = if op == b'h' {
                    read_u8(&mut r)? as u32
                } else {
                    u32::from_le_bytes(read_bytes(&mut r, 4)?.try_into().unwrap())
                };
                let s = *memo
                    .get(&id)
                    .ok_or_else(|| format!("memo entry {id} read before it is written"))?;
                push(&mut stack, s, &mut total);
            }
            b'q' | b'r' => {
                let id = if op == b'q' {
                    read_u8(&mut r)? as u32
                } else {
                    u32::from_le_bytes(read_bytes(&mut r, 4)?.try_into().unwrap())
                };
                let top = *stack
                    .last()
                    .ok_or_else(|| format!("memo write on an empty stack at byte {pos}"))?;
                // candle clones the value into its memo.
                total += top.nodes;
                memo.insert(id, top);
            }
            b'.' => {
                return if stack.len() == 1 && !stack[0].mark {
                    Ok(())
                } else {
                    Err(format!(
                        "the pickle stops with {} values on its stack, expected one",
                        stack.len()
                    ))
                };
            }
            other => {
                return Err(format!(
                    "opcode 0x{other:02x} at byte {pos} is not one a torch.save of plain data uses"
                ));
            }
        }
        if let Some(top) = stack.last()
            && top.depth > MAX_DEPTH
        {
            return Err(format!(
                "values nest more than {MAX_DEPTH} deep (at byte {pos})"
            ));
        }
        if total > MAX_NODES {
            return Err(format!(
                "the pickle builds more than {MAX_NODES} values (at byte {pos})"
            ));
        }
    }
}

fn wrap(items: &[Shadow]) -> Shadow {
    Shadow {
        depth: 1 + items.iter().map(|s| s.depth).max().unwrap_or(0),
        nodes: 1 + items.iter().map(|s| s.nodes).sum::<u64>(),
        mark: false,
    }
}

fn grow(container: &mut Shadow, items: &[Shadow]) {
    for s in items {
        container.depth = container.depth.max(s.depth + 1);
        container.nodes += s.nodes;
    }
}

fn pop(stack: &mut Vec<Shadow>) -> Result<Shadow, String> {
    match stack.pop() {
        Some(s) if !s.mark => Ok(s),
        _ => Err("the pickle pops a value that is not there".into()),
    }
}

fn last(stack: &mut [Shadow]) -> Result<&mut Shadow, String> {
    match stack.last_mut() {
        Some(s) if !s.mark => Ok(s),
        _ => Err("the pickle appends to a value that is not there".into()),
    }
}

fn pop_mark(stack: &mut Vec<Shadow>) -> Result<Vec<Shadow>, String> {
    let i = stack
        .iter()
        .rposition(|s| s.mark)
        .ok_or_else(|| "the pickle closes a mark it never opened".to_string())?;
    let items = stack.split_off(i + 1);
    stack.pop();
    Ok(items)
}

fn read_u8(r: &mut Cursor<&[u8]>) -> Result<u8, String> {
    Ok(read_bytes(r, 1)?[0])
}

fn read_bytes<'a>(r: &mut Cursor<&'a [u8]>, n: usize) -> Result<&'a [u8], String> {
    let data: &'a [u8] = r.get_ref();
    let start = r.position() as usize;
    let end = start
        .checked_add(n)
        .filter(|&e| e <= data.len())
        .ok_or_else(|| format!("the pickle ends inside a value at byte {start}"))?;
    r.set_position(end as u64);
    Ok(&data[start..end])
}

fn read_line(r: &mut Cursor<&[u8]>) -> Result<String, String> {
    let data: &[u8] = r.get_ref();
    let start = r.position() as usize;
    let rest = &data[start.min(data.len())..];
    let n = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| format!("a global name without its line end at byte {start}"))?;
    r.set_position((start + n + 1) as u64);
    Ok(String::from_utf8_lossy(&rest[..n]).into_owned())
}

fn convert(object: Object, st: &mut StorageLookup, depth: u32) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err(format!("values nest more than {MAX_DEPTH} deep"));
    }
    let list = |items: Vec<Object>, st: &mut StorageLookup| {
        items
            .into_iter()
            .map(|o| convert(o, st, depth + 1))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match object {
        Object::None => Value::None,
        Object::Bool(b) => Value::Bool(b),
        Object::Int(i) => Value::Int(i as i64),
        Object::Long(i) => Value::Int(i),
        Object::Float(f) => Value::Float(f),
        Object::Unicode(s) => Value::Str(s),
        Object::Tuple(items) | Object::List(items) => Value::List(list(items, st)?),
        Object::Dict(items) => Value::Dict(
            items
                .into_iter()
                .map(|(k, v)| Ok((convert(k, st, depth + 1)?, convert(v, st, depth + 1)?)))
                .collect::<Result<Vec<_>, String>>()?,
        ),
        Object::Reduce { callable, args } => match *callable {
            Object::Class {
                module_name,
                class_name,
            } if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2" => {
                Value::Tensor(rebuild_tensor(*args, st)?)
            }
            other => return Err(format!("a call of {} is not plain data", describe(&other))),
        },
        Object::Class {
            module_name,
            class_name,
        } => {
            return Err(format!(
                "the class `{module_name}.{class_name}` where plain data was expected"
            ));
        }
        Object::Build { callable, .. } => {
            return Err(format!(
                "an object built from {} is not plain data",
                describe(&callable)
            ));
        }
        Object::PersistentLoad(_) => {
            return Err("a tensor storage outside a tensor".into());
        }
        Object::Mark => return Err("a stray mark in the pickle".into()),
    })
}

fn describe(o: &Object) -> String {
    match o {
        Object::Class {
            module_name,
            class_name,
        } => format!("`{module_name}.{class_name}`"),
        _ => "a value that is not a class".into(),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[,
/// metadata])`, the storage being a persistent id `('storage', StorageClass, key, location,
/// numel)`.
fn rebuild_tensor(args: Object, st: &mut StorageLookup) -> Result<Tensor, String> {
    let bad = |what: &str| format!("tensor record: {what}");
    let Object::Tuple(args) = args else {
        return Err(bad("arguments are not a tuple"));
    };
    if args.len() < 4 {
        return Err(bad("fewer than 4 arguments"));
    }
    let mut args = args.into_iter();
    let storage = args.next().unwrap();
    let offset = as_usize(args.next().unwrap()).ok_or_else(|| bad("offset is not a count"))?;
    let shape = usizes(args.next().unwrap()).ok_or_else(|| bad("size is not a tuple of counts"))?;
    let stride =
        usizes(args.next().unwrap()).ok_or_else(|| bad("stride is not a tuple of counts"))?;
    if shape.len() != stride.len() {
        return Err(bad("size and stride differ in length"));
    }
    let Object::PersistentLoad(id) = storage else {
        return Err(bad("storage is not a persistent id"));
    };
    let Object::Tuple(id) = *id else {
        return Err(bad("storage id is not a tuple"));
    };
    if id.len() != 5 || id[0] != Object::Unicode("storage".into()) {
        return Err(bad(
            "storage id is not ('storage', class, key, location, numel)",
        ));
    }
    let mut id = id.into_iter().skip(1);
    let class = match id.next().unwrap() {
        Object::Class { class_name, .. } => class_name,
        _ => return Err(bad("storage class is not a class")),
    };
    let dtype = DType::from_storage(&class)
        .ok_or_else(|| bad(&format!("storage class {class} is not supported")))?;
    let key = match id.next().unwrap() {
        Object::Unicode(s) => s,
        _ => return Err(bad("storage key is not a string")),
    };
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(bad(&format!("storage key {key:?} is not a plain name")));
    }
    let bytes = st(&key)?;
    let numel_stored = bytes.len() / dtype.size();
    let mut count: usize = 1;
    let mut last: usize = offset;
    for (&d, &s) in shape.iter().zip(&stride) {
        count = count
            .checked_mul(d)
            .ok_or_else(|| bad("element count overflows"))?;
        if d > 0 {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(last))
                .ok_or_else(|| bad("extent overflows"))?;
        }
    }
    // A view with zero strides may repeat elements, but not without bound: a few bytes must not
    // ask for gigabytes.
    if count > numel_stored.max(1).saturating_mul(16) || count > 1 << 28 {
        return Err(bad(&format!(
            "shape {shape:?} has {count} elements, far more than storage {key} holds ({numel_stored})"
        )));
    }
    if count > 0 && last >= numel_stored {
        return Err(bad(&format!(
            "shape {shape:?} (stride {stride:?}, offset {offset}) reaches element {last}, but storage {key} holds {numel_stored}"
        )));
    }
    let mut idx = vec![0usize; shape.len()];
    let elem = |i: usize| &bytes[i * dtype.size()..(i + 1) * dtype.size()];
    let mut ints = Vec::new();
    let mut floats = Vec::new();
    for _ in 0..count {
        let at = offset + idx.iter().zip(&stride).map(|(&i, &s)| i * s).sum::<usize>();
        let b = elem(at);
        match dtype {
            DType::I64 => ints.push(i64::from_le_bytes(b.try_into().unwrap())),
            DType::I32 => ints.push(i32::from_le_bytes(b.try_into().unwrap()) as i64),
            DType::I16 => ints.push(i16::from_le_bytes(b.try_into().unwrap()) as i64),
            DType::I8 => ints.push(b[0] as i8 as i64),
            DType::U8 | DType::Bool => ints.push(b[0] as i64),
            DType::F32 => floats.push(f32::from_le_bytes(b.try_into().unwrap()) as f64),
            DType::F64 => floats.push(f64::from_le_bytes(b.try_into().unwrap())),
            DType::F16 => floats.push(half::f16::from_le_bytes(b.try_into().unwrap()).to_f64()),
            DType::BF16 => floats.push(half::bf16::from_le_bytes(b.try_into().unwrap()).to_f64()),
        }
        for k in (0..idx.len()).rev() {
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    Ok(Tensor {
        dtype,
        shape,
        data: if dtype.is_integer() {
            TensorData::Int(ints)
        } else {
            TensorData::Float(floats)
        },
    })
}

fn as_usize(o: Object) -> Option<usize> {
    match o {
        Object::Int(i) => usize::try_from(i).ok(),
        Object::Long(i) => usize::try_from(i).ok(),
        _ => None,
    }
}

fn usizes(o: Object) -> Option<Vec<usize>> {
    match o {
        Object::Tuple(items) => items.into_iter().map(as_usize).collect(),
        _ => None,
    }
}
