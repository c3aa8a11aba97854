//! The layering check: reads the table of allowed directions from
//! `docs/ARCHITECTURE.md` (between the `layering:begin` and `layering:end`
//! markers) and every `crate::…` path in `src/` (and `metald::…` in the
//! binaries), and fails when a module imports one its layer may not, when the
//! table itself has a cycle or misses a module, or when the files of one
//! module import each other in a cycle (`super::`, `self::` and `crate::`
//! paths between the submodules, including a `mod.rs` and its children).
//!
//! Hand-written rather than a dependency-graph tool: cargo-modules and the
//! like need nightly or a rust-analyzer build, and what is checked here is a
//! plain reading of paths. Unit tests beside the code (`tests.rs`,
//! `*_tests.rs`, everything after a file's first `#[cfg(test)]`) are not
//! checked: they may reach across layers to build fixtures.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_possible_wrap)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The tree checked: this crate, or `METALD_LAYERING_ROOT` (to run the check
/// against another checkout, e.g. an older commit, without building it).
fn root() -> PathBuf {
    std::env::var_os("METALD_LAYERING_ROOT").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// Allowed imports of each top-level module, from the architecture doc.
fn allowed() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).unwrap();
    let start = doc.find("<!-- layering:begin -->").expect("layering:begin marker in docs/ARCHITECTURE.md");
    let end = doc.find("<!-- layering:end -->").expect("layering:end marker in docs/ARCHITECTURE.md");
    let mut table = BTreeMap::new();
    for line in doc[start..end].lines() {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() != 2 || !cells[0].starts_with('`') {
            continue;
        }
        let module = cells[0].trim_matches('`').to_owned();
        let deps = cells[1]
            .split(',')
            .map(|d| d.trim().trim_matches('`').to_owned())
            .filter(|d| !d.is_empty() && d != "—")
            .collect();
        assert!(table.insert(module.clone(), deps).is_none(), "{module} is listed twice");
    }
    assert!(!table.is_empty(), "no rows between the layering markers");
    table
}

/// One source file: its module path (`billing::spool`) and the code lines
/// that are not unit tests.
struct Source {
    module: Vec<String>,
    code: Vec<String>,
}

fn sources() -> Vec<Source> {
    let mut out = Vec::new();
    walk(&root().join("src"), &mut out);
    out
}

fn walk(dir: &Path, out: &mut Vec<Source>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
            continue;
        }
        let name = p.file_name().unwrap().to_str().unwrap();
        if !name.ends_with(".rs") || name == "tests.rs" || name.ends_with("_tests.rs") {
            continue;
        }
        let rel = p.strip_prefix(root().join("src")).unwrap();
        let mut module: Vec<String> =
            rel.iter().map(|c| c.to_str().unwrap().trim_end_matches(".rs").to_owned()).collect();
        if matches!(name, "mod.rs" | "lib.rs") {
            module.pop();
        }
        if module.first().map(String::as_str) == Some("bin") {
            // Every binary (and its helper modules) is one module, `bin`.
            module.truncate(1);
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let code = without_test_items(text.lines().map(strip_comment_and_strings).collect());
        out.push(Source { module, code });
    }
}

/// The lines without the items marked `#[cfg(test)]` (a `mod tests { … }`,
/// a test-only function): each is skipped from its attribute to the line
/// where its braces balance (or its `;`, for `mod tests;`).
fn without_test_items(lines: Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = lines.into_iter();
    while let Some(line) = it.next() {
        if line.trim() != "#[cfg(test)]" {
            if !line.trim().is_empty() {
                out.push(line);
            }
            continue;
        }
        let mut depth = 0i32;
        let mut opened = false;
        for item in it.by_ref() {
            let t = item.trim();
            if !opened && t.starts_with("#[") {
                continue;
            }
            depth += t.matches('{').count() as i32 - t.matches('}').count() as i32;
            opened |= t.contains('{');
            if (opened && depth <= 0) || (!opened && t.ends_with(';')) {
                break;
            }
        }
    }
    out
}

/// The line without its `//` comment and without the contents of string
/// literals (a target name like `"metald::log"` is not a path).
fn strip_comment_and_strings(line: &str) -> String {
    let mut out = String::new();
    let mut in_str = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if in_str {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    in_str = false;
                    out.push('"');
                }
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_str = true;
                out.push('"');
            }
            '/' if chars.peek() == Some(&'/') => break,
            '\'' => {
                // A char literal such as '"' must not open a string.
                let rest: String = chars.clone().take(3).collect();
                if rest.chars().nth(1) == Some('\'') {
                    chars.next();
                    chars.next();
                }
                out.push('\'');
            }
            _ => out.push(c),
        }
    }
    out
}

/// Every path in `line` that starts with one of `roots` (`crate`, `super`,
/// `self`, `metald`), as its segments, including each path of a
/// `use x::{a, b::c}` group.
fn paths(line: &str, roots: &[&str]) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let bytes = line.as_bytes();
    for root in roots {
        let pat = format!("{root}::");
        let mut from = 0;
        while let Some(i) = line[from..].find(&pat) {
            let at = from + i;
            from = at + pat.len();
            let before = if at == 0 { b' ' } else { bytes[at - 1] };
            if before.is_ascii_alphanumeric() || before == b'_' || before == b':' {
                continue;
            }
            let mut prefix = vec![(*root).to_owned()];
            expand(&line[at + pat.len()..], &mut prefix, &mut found);
        }
    }
    found
}

/// Reads `a::b::{c, d::e}` after a prefix, pushing each full path.
fn expand(rest: &str, prefix: &mut Vec<String>, found: &mut Vec<Vec<String>>) {
    let ident: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    if ident.is_empty() {
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        expand_item(&group[start..i], prefix, found);
                        return;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand_item(&group[start..i], prefix, found);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            // A group continued on the next lines: what is on this one.
            expand_item(&group[start..], prefix, found);
        } else {
            found.push(prefix.clone());
        }
        return;
    }
    prefix.push(ident.clone());
    let after = &rest[ident.len()..];
    match after.strip_prefix("::") {
        Some(more) => expand(more, prefix, found),
        None => found.push(prefix.clone()),
    }
    prefix.pop();
}

fn expand_item(item: &str, prefix: &mut Vec<String>, found: &mut Vec<Vec<String>>) {
    let item = item.trim();
    if item.is_empty() {
        return;
    }
    expand(item, prefix, found);
}

/// A `use` group spread over several lines (`use crate::{\n a,\n b::c,\n};`)
/// is joined into one line so its members are read as paths.
fn joined_statements(code: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending: Option<String> = None;
    for line in code {
        if let Some(p) = pending.as_mut() {
            p.push(' ');
            p.push_str(line.trim());
            if line.contains(';') {
                out.push(pending.take().unwrap());
            }
            continue;
        }
        let t = line.trim_start();
        if (t.starts_with("use ") || t.starts_with("pub use ") || t.starts_with("pub(crate) use ")) && !t.contains(';')
        {
            pending = Some(line.clone());
        } else {
            out.push(line.clone());
        }
    }
    out.extend(pending);
    out
}

#[test]
fn the_table_names_every_module_and_has_no_cycle() {
    let table = allowed();
    let tops: BTreeSet<String> = sources().iter().map(|s| s.module.first().cloned().unwrap_or_default()).collect();
    for top in &tops {
        if top.is_empty() {
            continue; // lib.rs itself
        }
        assert!(table.contains_key(top), "module `{top}` is missing from the layering table in docs/ARCHITECTURE.md");
    }
    for (m, deps) in &table {
        for d in deps {
            assert!(table.contains_key(d), "`{m}` may import `{d}`, which the table does not list");
        }
    }
    // Topological order: repeatedly remove modules whose allowed imports are
    // all removed already; a cycle leaves some behind.
    let mut left = table.clone();
    while !left.is_empty() {
        let ready: Vec<String> = left
            .iter()
            .filter(|(_, deps)| deps.iter().all(|d| !left.contains_key(d)))
            .map(|(m, _)| m.clone())
            .collect();
        assert!(!ready.is_empty(), "the layering table has a cycle among {:?}", left.keys().collect::<Vec<_>>());
        for m in ready {
            left.remove(&m);
        }
    }
}

#[test]
fn modules_import_only_what_their_layer_allows() {
    let table = allowed();
    let mut problems = BTreeSet::new();
    for src in sources() {
        let Some(top) = src.module.first() else { continue };
        let Some(allowed) = table.get(top) else { continue };
        let roots: &[&str] = if top == "bin" { &["metald", "crate"] } else { &["crate"] };
        for line in joined_statements(&src.code) {
            for path in paths(&line, roots) {
                let Some(target) = path.get(1) else { continue };
                if target == top || allowed.contains(target) {
                    continue;
                }
                problems.insert(format!(
                    "{} imports {} — `{top}` may import only {:?}",
                    src.module.join("::"),
                    path.join("::"),
                    allowed
                ));
            }
        }
    }
    assert!(problems.is_empty(), "layering violations:\n{}", problems.into_iter().collect::<Vec<_>>().join("\n"));
}

#[test]
fn no_cycle_between_the_files_of_a_module() {
    let sources = sources();
    let known: BTreeSet<Vec<String>> = sources.iter().map(|s| s.module.clone()).collect();
    // The longest known module that `path` (absolute segments) names.
    let resolve = |path: &[String]| -> Option<Vec<String>> {
        (1..=path.len()).rev().map(|n| path[..n].to_vec()).find(|p| known.contains(p))
    };
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for src in &sources {
        if src.module.first().map(String::as_str) == Some("bin") {
            continue;
        }
        let here = src.module.clone();
        let parent = |m: &Vec<String>| -> Vec<String> { m[..m.len().saturating_sub(1)].to_vec() };
        // A module's children are also reached by bare name (`use spool::X`
        // in billing/mod.rs).
        let children: Vec<String> = known
            .iter()
            .filter(|k| k.len() == here.len() + 1 && k.starts_with(&here))
            .map(|k| k[here.len()].clone())
            .collect();
        let mut roots = vec!["crate", "super", "self"];
        roots.extend(children.iter().map(String::as_str));
        for line in joined_statements(&src.code) {
            for path in paths(&line, &roots) {
                // `super` of `billing::spool` (spool.rs) is `billing`, and of
                // `billing` (billing/mod.rs) the crate: the parent either way.
                let (mut abs, skip): (Vec<String>, usize) = match path[0].as_str() {
                    "crate" => (Vec::new(), 1),
                    "self" => (here.clone(), 1),
                    "super" => (parent(&here), 1),
                    _ => (here.clone(), 0),
                };
                let mut segs = path[skip..].iter().peekable();
                while segs.peek().map(|s| s.as_str()) == Some("super") {
                    segs.next();
                    abs.pop();
                }
                abs.extend(segs.cloned());
                let Some(target) = resolve(&abs) else { continue };
                // Only edges inside one top-level module, between different files.
                if target == here || target.first() != here.first() || target.is_empty() {
                    continue;
                }
                edges.entry(here.clone()).or_default().insert(target);
            }
        }
    }
    // Depth-first search for a cycle.
    let mut state: BTreeMap<Vec<String>, u8> = BTreeMap::new();
    let mut cycles = Vec::new();
    fn visit(
        m: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
        cycles: &mut Vec<String>,
    ) {
        state.insert(m.clone(), 1);
        stack.push(m.clone());
        for n in edges.get(m).into_iter().flatten() {
            match state.get(n).copied().unwrap_or(0) {
                0 => visit(n, edges, state, stack, cycles),
                1 => {
                    let from = stack.iter().position(|s| s == n).unwrap_or(0);
                    let mut ring: Vec<String> = stack[from..].iter().map(|s| s.join("::")).collect();
                    ring.push(n.join("::"));
                    cycles.push(ring.join(" → "));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.clone(), 2);
    }
    for m in edges.keys() {
        if state.get(m).copied().unwrap_or(0) == 0 {
            visit(m, &edges, &mut state, &mut Vec::new(), &mut cycles);
        }
    }
    assert!(cycles.is_empty(), "import cycles between files:\n{}", cycles.join("\n"));
}

#[test]
fn paths_are_read_from_use_groups_and_code() {
    let p = paths("use crate::{model::{VmId, Op}, store::Store};", &["crate"]);
    assert_eq!(p, vec![vec!["crate", "model", "VmId"], vec!["crate", "model", "Op"], vec!["crate", "store", "Store"],]);
    let p = paths("let x = crate::backend::process::resolve_binary(b);", &["crate"]);
    assert_eq!(p, vec![vec!["crate", "backend", "process", "resolve_binary"]]);
    assert!(paths(&strip_comment_and_strings(r#"target: "metald::log", // crate::core"#), &["crate"]).is_empty());
    assert_eq!(paths("use super::super::x;", &["super"]), vec![vec!["super", "super", "x"]]);
}
