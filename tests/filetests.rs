//! Filetests: a pass applied to a model stated in IR text, and the IR text it leaves.
//!
//! Each `tests/filetests/*.ir` file holds, in order:
//! - `; run: Pass(settings)`: the pass and its RON settings, as in a pipeline (relative
//!   paths are resolved against `tests/filetests/`);
//! - the input module in IR text (`upmix_ir::parse_module`), comments allowed;
//! - a line `; expect:` followed by the module after the pass, as `print_module` prints
//!   it, or a line `; expect error:` followed by the error the pass (or the verifier after
//!   it) reports, each of its lines after `; `.
//!
//! The pass runs under the pass manager, so the verifier checks what it leaves, and the
//! text of what it leaves must parse back to it (`structural_diff`). A file
//! whose result differs from its expectation fails with both texts; `UPMIX_BLESS=1`
//! rewrites the expectations instead. Passes that run models get the CPU runtime.

use std::path::{Path, PathBuf};

use upmix::ir::{parse_module, print_module, structural_diff, MappedFile, Module};
use upmix::passes::{PassContext, PassManager};
use upmix::pipeline::DeviceRuntimes;

const EXPECT: &str = "; expect:";
const EXPECT_ERROR: &str = "; expect error:";

/// One filetest, split into its parts.
struct FileTest {
    path: PathBuf,
    run: String,
    input: String,
    expected: String,
}

impl FileTest {
    fn read(path: &Path) -> FileTest {
        let text = std::fs::read_to_string(path).unwrap();
        let run = text
            .lines()
            .find_map(|l| l.strip_prefix("; run:"))
            .unwrap_or_else(|| panic!("{}: no `; run:` line", path.display()))
            .trim()
            .to_string();
        let at = text
            .lines()
            .position(|l| l == EXPECT || l == EXPECT_ERROR)
            .unwrap_or_else(|| panic!("{}: no `{EXPECT}` line", path.display()));
        let lines: Vec<&str> = text.lines().collect();
        FileTest {
            path: path.to_path_buf(),
            run,
            input: lines[..at].join("\n") + "\n",
            expected: lines[at..].join("\n") + "\n",
        }
    }

    /// What the pass leaves, in the form the expectation is written in.
    fn outcome(&self) -> String {
        let dir = self.path.parent().unwrap();
        let files = |name: &str| MappedFile::open(&dir.join(name)).ok();
        let mut m = match parse_module(&self.input, &files) {
            Ok(m) => m,
            Err(e) => panic!("{}: the input does not parse: {e}", self.path.display()),
        };
        let (name, args) = self
            .run
            .split_at(self.run.find('(').unwrap_or(self.run.len()));
        let mut pass = upmix::passes::create(name, args)
            .unwrap_or_else(|e| panic!("{}: {e}", self.path.display()));
        pass.resolve_paths(&|p: &Path| dir.join(p));
        let mut manager = PassManager::new();
        manager.add(pass);
        let mut runtimes = DeviceRuntimes::new(upmix::backends::DeviceSpec::Cpu);
        let mut cx = PassContext {
            runtimes: Some(&mut runtimes),
            ..PassContext::default()
        };
        match manager.run(&mut m, &mut cx) {
            Ok(_) => {
                let text = print_module(&m);
                self.reads_back(&m, &text);
                format!("{EXPECT}\n{text}")
            }
            Err(e) => {
                let lines: Vec<String> = e.to_string().lines().map(|l| format!("; {l}")).collect();
                format!("{EXPECT_ERROR}\n{}\n", lines.join("\n"))
            }
        }
    }
}

impl FileTest {
    /// Checks that the text of what the pass left parses back to it.
    fn reads_back(&self, m: &Module, text: &str) {
        let dir = self.path.parent().unwrap();
        let parsed = parse_module(text, &|name| MappedFile::open(&dir.join(name)).ok())
            .unwrap_or_else(|e| panic!("{}: the output does not parse: {e}", self.path.display()));
        if let Some(diff) = structural_diff(&parsed, m) {
            panic!(
                "{}: the output reads back differently: {diff}",
                self.path.display()
            );
        }
    }
}

fn filetests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ir"))
        .collect();
    paths.sort();
    paths
}

#[test]
fn every_filetest_leaves_its_expected_ir() {
    let bless = std::env::var_os("UPMIX_BLESS").is_some_and(|v| v == "1");
    let mut failed = Vec::new();
    let tests = filetests();
    for path in &tests {
        let t = FileTest::read(path);
        let got = t.outcome();
        if got == t.expected {
            continue;
        }
        if bless {
            std::fs::write(path, t.input.clone() + &got).unwrap();
            eprintln!("blessed {}", path.display());
        } else {
            failed.push(format!(
                "{}:\n--- expected\n{}--- got\n{got}",
                path.display(),
                t.expected
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} filetests differ (UPMIX_BLESS=1 rewrites them):\n{}",
        failed.len(),
        tests.len(),
        failed.join("\n")
    );
}

/// Every pass has a filetest: a file whose `; run:` line names it.
#[test]
fn every_pass_has_a_filetest() {
    let runs: Vec<String> = filetests().iter().map(|p| FileTest::read(p).run).collect();
    for pass in upmix::passes::REGISTRY {
        let named = runs
            .iter()
            .any(|r| r.starts_with(&format!("{}(", pass.name)));
        assert!(named, "no filetest runs {}", pass.name);
    }
}

/// A filetest fails when its expectation is edited: the runner compares what the pass
/// leaves with the file, not with itself.
#[test]
fn an_edited_expectation_fails() {
    let path = &filetests()[0];
    let mut t = FileTest::read(path);
    assert_eq!(t.outcome(), t.expected, "{}", path.display());
    t.expected = t.expected.replacen("graph ", "graph  ", 1);
    assert_ne!(t.outcome(), t.expected);
}
