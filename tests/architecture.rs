//! The module graph is one-way: listener → policy → front door → pipeline → upstream, with config,
//! metrics and the swap cell as leaves. This reads every `crate::…` and `super::…` path in src/ and
//! fails on a cycle between top-level modules, or between the files of `relay/` and `upstream/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The code of a file without comments, string literals and its `#[cfg(test)]` module.
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            // A char literal '"' is not a string.
            '\'' if chars.peek() == Some(&'"') => {
                chars.next();
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => break,
                        _ => escaped = false,
                    }
                }
                out.push_str("\"\"");
            }
            _ => out.push(c),
        }
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first segment of every path that follows `prefix` (`crate::`, `super::`), braces included:
/// `crate::{a::B, c}` gives `a` and `c`.
fn first_segments(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().last();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if c.is_whitespace() => {}
                    _ if item_start => {
                        item_start = false;
                        let id = ident_at(&group[i..]);
                        if !id.is_empty() {
                            found.insert(id.to_owned());
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let id = ident_at(rest);
            if !id.is_empty() {
                found.insert(id.to_owned());
            }
        }
    }
    found
}

/// Whether `code` has a path starting `name::`.
fn names_path(code: &str, name: &str) -> bool {
    let needle = format!("{name}::");
    code.match_indices(&needle).any(|(at, _)| {
        !code[..at]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

type Graph = BTreeMap<String, BTreeSet<String>>;

/// A cycle in `graph`, as the list of its nodes, if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut done, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Top-level module → the top-level modules it names.
fn top_level_graph() -> Graph {
    let src = src();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| top_module(&src, f))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut graph = Graph::new();
    for file in &files {
        let from = top_module(&src, file);
        if !modules.contains(&from) {
            continue;
        }
        let code = code_of(file);
        let edges = graph.entry(from.clone()).or_default();
        for to in first_segments(&code, "crate::") {
            if to != from && modules.contains(&to) {
                edges.insert(to);
            }
        }
    }
    graph
}

fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// The files of `src/<dir>/` → the files of that folder they name (`mod` for mod.rs).
fn folder_graph(dir: &str) -> Graph {
    let folder = src().join(dir);
    let mut files = Vec::new();
    rust_files(&folder, &mut files);
    let name = |f: &Path| f.file_stem().unwrap().to_string_lossy().into_owned();
    let members: BTreeSet<String> = files.iter().map(|f| name(f)).collect();
    let mut graph = Graph::new();
    for file in &files {
        let from = name(file);
        let code = code_of(file);
        let edges = graph.entry(from.clone()).or_default();
        let mut named = first_segments(&code, &format!("crate::{dir}::"));
        if from == "mod" {
            // mod.rs names its children without a prefix.
            for child in &members {
                if names_path(&code, child) {
                    named.insert(child.clone());
                }
            }
        } else {
            named.extend(first_segments(&code, "super::"));
        }
        for to in named {
            let to = if members.contains(&to) {
                to
            } else {
                // An item of the folder's mod.rs.
                "mod".to_owned()
            };
            if to != from {
                edges.insert(to);
            }
        }
    }
    graph
}

fn assert_acyclic(what: &str, graph: &Graph) {
    if let Some(cycle) = find_cycle(graph) {
        panic!(
            "import cycle between {what}: {}\nthe graph: {graph:#?}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn top_level_modules_import_one_way() {
    let graph = top_level_graph();
    assert!(graph.contains_key("relay") && graph.contains_key("upstream"));
    assert_acyclic("top-level modules", &graph);
}

#[test]
fn relay_files_import_one_way() {
    assert_acyclic("files of src/relay/", &folder_graph("relay"));
}

#[test]
fn upstream_files_import_one_way() {
    assert_acyclic("files of src/upstream/", &folder_graph("upstream"));
}

#[test]
fn config_metrics_and_the_swap_cell_are_leaves() {
    let graph = top_level_graph();
    for leaf in ["metrics", "swap"] {
        let edges = graph.get(leaf).cloned().unwrap_or_default();
        assert!(edges.is_empty(), "{leaf} imports {edges:?}");
    }
    // config knows only the pure policy types it parses into.
    let edges = graph.get("config").cloned().unwrap_or_default();
    assert!(
        edges.iter().all(|m| m == "policy" || m == "fasthash"),
        "config imports {edges:?}"
    );
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut g = Graph::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&g), None);
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&g).unwrap().len(), 4);
    let segs = first_segments("use crate::{a::B, c};\nlet x = crate::d::e();\n", "crate::");
    assert_eq!(segs, ["a", "c", "d"].map(String::from).into());
}

/// Every `Relay…` reason the code can answer with is in README's table of pushrelay's answers.
#[test]
fn every_relay_reason_is_in_the_readme_table() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let table: Vec<&str> = readme
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains("`Relay"))
        .collect();
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut reasons = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (at, _) in text.match_indices("\"Relay") {
            let reason = ident_at(&text[at + 1..]);
            if text[at + 1 + reason.len()..].starts_with('"') && reason.len() > "Relay".len() {
                reasons.insert(reason.to_owned());
            }
        }
    }
    assert!(reasons.len() > 10, "{reasons:?}");
    let missing: Vec<&String> = reasons
        .iter()
        .filter(|r| !table.iter().any(|l| l.contains(&format!("`{r}`"))))
        .collect();
    assert!(
        missing.is_empty(),
        "reasons missing from README's table: {missing:?}"
    );
}
