//! The server crate's modules import each other without cycles (ARCHITECTURE.md): a protocol
//! handler never reaches into the room, the transport does not know the rooms, and adding a
//! module that would close a loop fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The crate modules `source` names as `crate::module` outside comments and tests.
fn imports(source: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let code = source.split("#[cfg(test)]").next().unwrap_or_default();
    let mut found = BTreeSet::new();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            // `crate::{a, b::c}` names several.
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                group.split('}').next().unwrap_or_default().split(',').collect()
            } else {
                vec![rest]
            };
            for name in names {
                let name: String = name
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if modules.contains(&name) {
                    found.insert(name);
                }
            }
        }
    }
    found
}

#[test]
fn modules_import_each_other_without_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut sources = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("src") {
        let path = entry.expect("entry").path();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        if path.extension().is_some_and(|e| e == "rs") && name != "lib" {
            sources.insert(name, std::fs::read_to_string(&path).expect("read"));
        }
    }
    let modules: BTreeSet<String> = sources.keys().cloned().collect();
    let graph: BTreeMap<String, BTreeSet<String>> = sources
        .iter()
        .map(|(name, source)| {
            let mut deps = imports(source, &modules);
            deps.remove(name);
            (name.clone(), deps)
        })
        .collect();
    // Depth-first search for a path leading back to where it started.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            panic!("modules import each other in a cycle: {}", cycle.join(" → "));
        }
    }
    // The handlers stay sans-IO: no room, socket, store or driver in them.
    for handler in ["native", "yjs", "hocuspocus"] {
        let deps = &graph[handler];
        for forbidden in ["room", "rooms", "socket", "driver", "instance"] {
            assert!(!deps.contains(forbidden), "{handler} imports {forbidden}");
        }
    }
}
