//! config.example.yaml documents every key `Config` accepts. The accepted keys are read from the
//! serde shape itself (a serializer that records every struct field it is shown, including those
//! skipped because they are unset), so a new field fails this test until the example names it;
//! every key the example names, commented out or not, must be one `Config` accepts.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::rc::Rc;

use pushrelay::config::Config;
use serde::Serialize;
use serde::ser::{self, Impossible};

fn example() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The example with its commented-out keys switched on. The example's convention: a commented key
/// has its `#` where the key would start (`# cert: …`), so dropping `# ` puts it in place, and
/// the keys nested under it follow on the next comment lines, further in (`#   bind: …`,
/// `#   - topic: …`). Anything else (prose, an indented `#   word:` that continues a comment)
/// stays a comment.
fn uncommented(text: &str) -> String {
    let mut out = String::new();
    // Column of the first key of the run of commented keys being switched on.
    let mut run_from: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let switched = line[indent..].strip_prefix("# ").and_then(|after| {
            let inner = after.len() - after.trim_start().len();
            let key = after.trim_start();
            let key = key.strip_prefix("- ").unwrap_or(key);
            let key_len = key
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(key.len());
            if key_len == 0 || !key[key_len..].starts_with(':') {
                return None;
            }
            let column = indent + inner;
            match run_from {
                _ if inner == 0 => Some((after, column)),
                Some(from) if column > from => Some((after, from)),
                _ => None,
            }
        });
        match switched {
            Some((after, from)) => {
                out.push_str(&format!("{}{after}", &line[..indent]));
                run_from = Some(from);
            }
            None => {
                out.push_str(line);
                run_from = None;
            }
        }
        out.push('\n');
    }
    out
}

/// Dotted key paths of a YAML document, `[]` for list items (`listeners[].tls.ca_cert`).
fn documented_keys(value: &figment::value::Value, path: &str, out: &mut BTreeSet<String>) {
    use figment::value::Value;
    match value {
        Value::Dict(_, dict) => {
            for (key, child) in dict {
                let child_path = join(path, key);
                out.insert(child_path.clone());
                documented_keys(child, &child_path, out);
            }
        }
        Value::Array(_, items) => {
            for item in items {
                documented_keys(item, &format!("{path}[]"), out);
            }
        }
        _ => {}
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// The keys a value's serde shape has: every struct field, recursing into structs and list items.
/// Maps (such as `upstream.connect_to`) hold the admin's data, not keys, so they stop the walk.
#[derive(Clone)]
struct KeyRecorder {
    path: String,
    keys: Rc<RefCell<BTreeSet<String>>>,
}

#[derive(Debug)]
struct RecordError(String);

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RecordError {}

impl ser::Error for RecordError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        RecordError(msg.to_string())
    }
}

impl KeyRecorder {
    fn at(&self, suffix: &str) -> KeyRecorder {
        KeyRecorder {
            path: if suffix == "[]" {
                format!("{}[]", self.path)
            } else {
                join(&self.path, suffix)
            },
            keys: self.keys.clone(),
        }
    }

    fn field(&mut self, key: &'static str) -> KeyRecorder {
        let child = self.at(key);
        self.keys.borrow_mut().insert(child.path.clone());
        child
    }
}

macro_rules! scalars {
    ($($method:ident: $ty:ty),* $(,)?) => {
        $(fn $method(self, _: $ty) -> Result<(), RecordError> { Ok(()) })*
    };
}

impl ser::Serializer for KeyRecorder {
    type Ok = ();
    type Error = RecordError;
    type SerializeSeq = KeyRecorder;
    type SerializeTuple = KeyRecorder;
    type SerializeTupleStruct = KeyRecorder;
    type SerializeTupleVariant = KeyRecorder;
    type SerializeMap = Impossible<(), RecordError>;
    type SerializeStruct = KeyRecorder;
    type SerializeStructVariant = KeyRecorder;

    scalars!(
        serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_i64: i64, serialize_u8: u8, serialize_u16: u16, serialize_u32: u32,
        serialize_u64: u64, serialize_f32: f32, serialize_f64: f64, serialize_char: char,
        serialize_str: &str, serialize_bytes: &[u8], serialize_unit_struct: &'static str,
    );

    fn serialize_none(self) -> Result<(), RecordError> {
        Ok(())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<(), RecordError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), RecordError> {
        Ok(())
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
    ) -> Result<(), RecordError> {
        Ok(())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), RecordError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> Result<(), RecordError> {
        value.serialize(self)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<KeyRecorder, RecordError> {
        Ok(self.at("[]"))
    }
    fn serialize_tuple(self, _: usize) -> Result<KeyRecorder, RecordError> {
        Ok(self.at("[]"))
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<KeyRecorder, RecordError> {
        Ok(self.at("[]"))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<KeyRecorder, RecordError> {
        Ok(self.at("[]"))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, RecordError> {
        Err(RecordError(format!("{}: a map", self.path)))
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<KeyRecorder, RecordError> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<KeyRecorder, RecordError> {
        Ok(self)
    }
}

/// A map value ends the walk where it stands: its entries are data.
fn element<T: ?Sized + Serialize>(at: &KeyRecorder, value: &T) -> Result<(), RecordError> {
    match value.serialize(at.clone()) {
        Err(RecordError(e)) if e.ends_with(": a map") => Ok(()),
        other => other,
    }
}

/// Lists and tuples: each element is walked at the list's `[]` path.
macro_rules! elements {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for KeyRecorder {
            type Ok = ();
            type Error = RecordError;
            fn $method<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), RecordError> {
                element(self, value)
            }
            fn end(self) -> Result<(), RecordError> {
                Ok(())
            }
        }
    )*};
}
elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

/// Structs: each field is a key, walked further; a field left out because it is unset
/// (`skip_serializing_if`) is still a key.
macro_rules! fields {
    ($($trait:ident),*) => {$(
        impl ser::$trait for KeyRecorder {
            type Ok = ();
            type Error = RecordError;
            fn serialize_field<T: ?Sized + Serialize>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), RecordError> {
                let child = self.field(key);
                element(&child, value)
            }
            fn skip_field(&mut self, key: &'static str) -> Result<(), RecordError> {
                self.field(key);
                Ok(())
            }
            fn end(self) -> Result<(), RecordError> {
                Ok(())
            }
        }
    )*};
}
fields!(SerializeStruct, SerializeStructVariant);

fn accepted_keys(config: &Config) -> BTreeSet<String> {
    let recorder = KeyRecorder {
        path: String::new(),
        keys: Rc::default(),
    };
    config.serialize(recorder.clone()).unwrap();
    recorder.keys.take()
}

/// The example with its commented-out keys switched on is still a `Config`: every key it documents
/// is one pushrelay accepts (unknown keys are refused), so the comments cannot go stale.
#[test]
fn every_key_in_the_example_is_one_config_accepts() {
    let text = uncommented(&example());
    if let Err(e) = serde_saphyr::from_str::<Config>(&text) {
        panic!("config.example.yaml, commented keys switched on, is not a Config: {e}\n{text}");
    }
}

/// Every key of `Config` (found from its serde shape, nested structs and list items included)
/// appears in config.example.yaml, set or commented out.
#[test]
fn every_key_config_accepts_is_in_the_example() {
    let text = uncommented(&example());
    let config: Config = serde_saphyr::from_str(&text).unwrap();
    let tree: figment::value::Value = serde_saphyr::from_str(&text).unwrap();
    let mut documented = BTreeSet::new();
    documented_keys(&tree, "", &mut documented);
    // The example itself, fully switched on, is the most populated Config there is; the
    // defaults add nothing it leaves out, but a key it lacks entirely still shows up there.
    let mut accepted = accepted_keys(&config);
    accepted.extend(accepted_keys(&Config::default()));
    let missing: Vec<&String> = accepted.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "config.example.yaml does not document these keys: {missing:?}"
    );
    // The walk itself reaches into list items and optional sections.
    assert!(
        accepted.contains("upstream.identities[].topic") && accepted.contains("admin.bind"),
        "the key walk must reach list items and optional sections: {accepted:?}"
    );
}

/// The switch-on rule itself: keys come on in place, prose and list values stay comments.
#[test]
fn only_commented_keys_are_switched_on() {
    let text = "a:\n  # b: 1\n  # Prose: no\n  #   more: prose\n  # - not_a_key\n\
                # c:\n#   - d: x\n#     e: y\n# g:\n#   h: 1\ni: 2\n#   f: prose\n";
    assert_eq!(
        uncommented(text),
        "a:\n  b: 1\n  # Prose: no\n  #   more: prose\n  # - not_a_key\n\
         c:\n  - d: x\n    e: y\ng:\n  h: 1\ni: 2\n#   f: prose\n"
    );
}
