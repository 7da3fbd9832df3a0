//! Layer cache keys.
//!
//! A build is a chain: a base, then one step after another. Each link gets
//! a key, a hex SHA-256 over a canonical, versioned encoding, so the same
//! inputs give the same key on every node and every run, and any change
//! that could change the result gives a different one. A step whose key is
//! already in the cache is not run again (unless it is forced).
//!
//! What a step key covers, and why:
//! - **the parent key**: the base key for the first step, the previous
//!   step's key after that. Chain the keys of *every* step, also those that
//!   make no layer (ARG, ENV, LABEL...), and a change anywhere before a
//!   step reaches it: ARG values, which Docker exposes to RUN without them
//!   being in the stage's ENV, included;
//! - **the instruction**, all of it, with its variables already expanded
//!   (a different command, source, destination, `--chown`, `--chmod`, run
//!   user... is a different step);
//! - **the running configuration** the step executes under: ENV (sorted by
//!   name, since the order of a process's environment changes nothing),
//!   WORKDIR, USER and SHELL. ENV changes what a later RUN does, WORKDIR
//!   where a relative COPY lands, USER who owns what RUN creates. Labels,
//!   ports, CMD and ENTRYPOINT are left out: they change no file;
//! - **the inputs hash**: for COPY and ADD, [`crate::context::CopyPlan::content_hash`]
//!   of the files copied, so editing a copied file misses the cache while
//!   touching it (mtime) does not.
//!
//! Left out on purpose: the step's line or index (moving a step up or down
//! keeps its key when the chain before it is the same), [`Step::force`]
//! (a forced step is rebuilt and may overwrite the cached layer under the
//! same key), and anything about the machine.
//!
//! The encoding starts with a version string (`arca-layer-v1`,
//! `arca-base-v1`); change it whenever the encoding or the meaning of a
//! layer changes, and every old key stops matching.

use sha2::{Digest, Sha256};

use crate::context::{field, hex};
use crate::plan::{Command, CopyFrom, CopySpec, Instruction, Source, StageConfig, Step};

/// First field of every step key: bump it to invalidate all cached layers.
pub const LAYER_KEY_VERSION: &str = "arca-layer-v1";
/// First field of every base key.
pub const BASE_KEY_VERSION: &str = "arca-base-v1";

/// What a stage starts from, pinned to exact content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedBase {
    /// `FROM scratch`: nothing.
    Scratch,
    /// A registry image, by the digest of its platform-specific manifest
    /// (`sha256:...`), never by tag: a tag moves, a digest does not.
    Image {
        /// Manifest digest.
        manifest_digest: String,
    },
    /// A finished build of another template (E2B's `fromTemplate`).
    Template {
        /// The build id; a build never changes once finished.
        build_id: String,
    },
}

/// The key of a base: what the first step of a stage chains from.
///
/// A stage based on an earlier stage (`FROM build`) has no base key of its
/// own: it chains from the last key of that stage.
pub fn base_key(base: &ResolvedBase) -> String {
    let mut h = Sha256::new();
    field(&mut h, BASE_KEY_VERSION.as_bytes());
    match base {
        ResolvedBase::Scratch => field(&mut h, b"scratch"),
        ResolvedBase::Image { manifest_digest } => {
            field(&mut h, b"image");
            field(&mut h, manifest_digest.as_bytes());
        }
        ResolvedBase::Template { build_id } => {
            field(&mut h, b"template");
            field(&mut h, build_id.as_bytes());
        }
    }
    hex(&h.finalize())
}

/// The key of a step (see the module docs for what it covers).
///
/// - `parent`: the base key or the previous step's key;
/// - `config`: the configuration in effect when the step runs, that is
///   *before* its own changes: the base image's ENV, WORKDIR, USER and
///   SHELL with the earlier steps applied. Only `env`, `workdir`, `user`
///   and `shell` are read;
/// - `inputs_hash`: for COPY/ADD, the content hash of what is copied;
///   `None` for other steps.
pub fn step_key(
    parent: &str,
    step: &Step,
    config: &StageConfig,
    inputs_hash: Option<&str>,
) -> String {
    let mut e = Enc(Sha256::new());
    e.str(LAYER_KEY_VERSION);
    e.str(parent);
    e.instruction(&step.instruction);
    e.str("config");
    let mut env: Vec<&(String, String)> = config.env.iter().collect();
    env.sort();
    e.pairs(env.into_iter());
    e.opt(config.workdir.as_deref());
    e.opt(config.user.as_deref());
    e.list(&config.shell);
    e.str("inputs");
    e.opt(inputs_hash);
    hex(&e.0.finalize())
}

/// The canonical encoding: every string length-prefixed, every variant and
/// option tagged, every list counted.
struct Enc(Sha256);

impl Enc {
    fn str(&mut self, s: &str) {
        field(&mut self.0, s.as_bytes());
    }

    fn count(&mut self, n: usize) {
        field(&mut self.0, &(n as u64).to_le_bytes());
    }

    fn opt(&mut self, s: Option<&str>) {
        match s {
            None => self.str("none"),
            Some(s) => {
                self.str("some");
                self.str(s);
            }
        }
    }

    fn list(&mut self, items: &[String]) {
        self.count(items.len());
        for item in items {
            self.str(item);
        }
    }

    fn pairs<'a>(&mut self, pairs: impl ExactSizeIterator<Item = &'a (String, String)>) {
        self.count(pairs.len());
        for (k, v) in pairs {
            self.str(k);
            self.str(v);
        }
    }

    fn command(&mut self, c: &Command) {
        match c {
            Command::Shell { shell, script } => {
                self.str("shell-form");
                self.list(shell);
                self.str(script);
            }
            Command::Exec(argv) => {
                self.str("exec-form");
                self.list(argv);
            }
        }
    }

    fn copy(&mut self, spec: &CopySpec) {
        self.count(spec.sources.len());
        for source in &spec.sources {
            match source {
                Source::Path(p) => {
                    self.str("path");
                    self.str(p);
                }
                Source::Inline { name, content } => {
                    self.str("inline");
                    self.str(name);
                    self.str(content);
                }
            }
        }
        self.str(&spec.dest);
        match &spec.from {
            None => self.str("context"),
            Some(CopyFrom::Stage(n)) => {
                self.str("stage");
                self.str(&n.to_string());
            }
            Some(CopyFrom::Image(r)) => {
                self.str("image");
                self.str(r);
            }
            Some(CopyFrom::Files(h)) => {
                self.str("files");
                self.str(h);
            }
        }
        self.opt(spec.chown.as_deref());
        self.opt(spec.chmod.as_deref());
    }

    fn instruction(&mut self, i: &Instruction) {
        match i {
            Instruction::Arg { name, value } => {
                self.str("ARG");
                self.str(name);
                self.opt(value.as_deref());
            }
            Instruction::Env(pairs) => {
                self.str("ENV");
                self.pairs(pairs.iter());
            }
            Instruction::Label(pairs) => {
                self.str("LABEL");
                self.pairs(pairs.iter());
            }
            Instruction::Run { command, user } => {
                self.str("RUN");
                self.command(command);
                self.opt(user.as_deref());
            }
            Instruction::Copy(spec) => {
                self.str("COPY");
                self.copy(spec);
            }
            Instruction::Add(spec) => {
                self.str("ADD");
                self.copy(spec);
            }
            Instruction::Workdir(dir) => {
                self.str("WORKDIR");
                self.str(dir);
            }
            Instruction::User(user) => {
                self.str("USER");
                self.str(user);
            }
            Instruction::Cmd(c) => {
                self.str("CMD");
                self.command(c);
            }
            Instruction::Entrypoint(c) => {
                self.str("ENTRYPOINT");
                self.command(c);
            }
            Instruction::Expose(ports) => {
                self.str("EXPOSE");
                self.list(ports);
            }
            Instruction::Shell(shell) => {
                self.str("SHELL");
                self.list(shell);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn sh(script: &str) -> Command {
        Command::Shell {
            shell: vec!["/bin/sh".into(), "-c".into()],
            script: script.into(),
        }
    }

    fn run(script: &str) -> Step {
        Step {
            line: 3,
            instruction: Instruction::Run {
                command: sh(script),
                user: None,
            },
            force: false,
        }
    }

    fn config() -> StageConfig {
        StageConfig {
            env: vec![("A".into(), "1".into()), ("B".into(), "2".into())],
            workdir: Some("/app".into()),
            user: Some("user".into()),
            shell: vec!["/bin/sh".into(), "-c".into()],
            ..StageConfig::default()
        }
    }

    fn copy_step(spec: CopySpec) -> Step {
        Step {
            line: 1,
            instruction: Instruction::Copy(spec),
            force: false,
        }
    }

    fn spec() -> CopySpec {
        CopySpec {
            sources: vec![Source::Path("a".into())],
            dest: "/d/".into(),
            from: None,
            chown: None,
            chmod: None,
        }
    }

    #[test]
    fn keys_are_stable_hex() {
        let a = step_key("p", &run("make"), &config(), None);
        assert_eq!(a, step_key("p", &run("make"), &config(), None));
        assert_eq!(a.len(), 64);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        // Pinned: these must not change without a version bump (a changed
        // encoding silently reusing or orphaning cached layers).
        assert_eq!(
            base_key(&ResolvedBase::Scratch),
            "1fbecd7b93869c076b2b0e4d2ade90c4f7205a57da5c654cd22c0f108262976a"
        );
        assert_eq!(
            step_key(
                &base_key(&ResolvedBase::Scratch),
                &run("make"),
                &config(),
                Some("h")
            ),
            "4d42725087e0594b9ef4ab0e295c1e99e6f78a9600cdbc06627d17641042a75c"
        );
    }

    #[test]
    fn line_force_env_order_and_ignored_config_do_not_matter() {
        let base = step_key("p", &run("make"), &config(), None);
        let mut moved = run("make");
        moved.line = 99;
        moved.force = true;
        assert_eq!(step_key("p", &moved, &config(), None), base);
        let mut c = config();
        c.env.reverse();
        c.labels.insert("k".into(), "v".into());
        c.exposed.push("80/tcp".into());
        c.cmd = Some(Command::Exec(vec!["x".into()]));
        assert_eq!(step_key("p", &run("make"), &c, None), base);
    }

    #[test]
    fn every_input_changes_the_key() {
        let mut keys = BTreeSet::new();
        let mut add = |k: String| assert!(keys.insert(k.clone()), "duplicate key {k}");
        add(step_key("p", &run("make"), &config(), None));
        add(step_key("q", &run("make"), &config(), None));
        add(step_key("p", &run("make all"), &config(), None));
        add(step_key("p", &run("make"), &config(), Some("h")));
        let mut as_root = run("make");
        as_root.instruction = Instruction::Run {
            command: sh("make"),
            user: Some("root".into()),
        };
        add(step_key("p", &as_root, &config(), None));
        let exec = Step {
            instruction: Instruction::Run {
                command: Command::Exec(vec!["/bin/sh".into(), "-c".into(), "make".into()]),
                user: None,
            },
            ..run("")
        };
        add(step_key("p", &exec, &config(), None));
        let mut c = config();
        c.env[0].1 = "9".into();
        add(step_key("p", &run("make"), &c, None));
        let mut c = config();
        c.env.push(("C".into(), String::new()));
        add(step_key("p", &run("make"), &c, None));
        let mut c = config();
        c.workdir = None;
        add(step_key("p", &run("make"), &c, None));
        let mut c = config();
        c.user = Some("root".into());
        add(step_key("p", &run("make"), &c, None));
        let mut c = config();
        c.shell = vec!["/bin/bash".into(), "-c".into()];
        add(step_key("p", &run("make"), &c, None));
        // COPY: every operand and the content.
        add(step_key("p", &copy_step(spec()), &config(), Some("h1")));
        add(step_key("p", &copy_step(spec()), &config(), Some("h2")));
        let variants = [
            CopySpec {
                dest: "/e/".into(),
                ..spec()
            },
            CopySpec {
                chown: Some("1:1".into()),
                ..spec()
            },
            CopySpec {
                chmod: Some("755".into()),
                ..spec()
            },
            CopySpec {
                from: Some(CopyFrom::Stage(0)),
                ..spec()
            },
            CopySpec {
                from: Some(CopyFrom::Files("x".into())),
                ..spec()
            },
            CopySpec {
                sources: vec![Source::Inline {
                    name: "a".into(),
                    content: String::new(),
                }],
                ..spec()
            },
        ];
        for v in variants {
            add(step_key("p", &copy_step(v), &config(), Some("h1")));
        }
        let add_step = Step {
            instruction: Instruction::Add(spec()),
            ..copy_step(spec())
        };
        add(step_key("p", &add_step, &config(), Some("h1")));
        // Strings cannot run into each other: ("ab", "c") is not ("a", "bc").
        let env = |a: &str, b: &str| Step {
            line: 1,
            instruction: Instruction::Env(vec![(a.into(), b.into())]),
            force: false,
        };
        add(step_key("p", &env("ab", "c"), &config(), None));
        add(step_key("p", &env("a", "bc"), &config(), None));
    }

    #[test]
    fn base_keys_differ_by_kind_and_value() {
        let keys: BTreeSet<String> = [
            ResolvedBase::Scratch,
            ResolvedBase::Image {
                manifest_digest: "sha256:aa".into(),
            },
            ResolvedBase::Image {
                manifest_digest: "sha256:bb".into(),
            },
            ResolvedBase::Template {
                build_id: "sha256:aa".into(),
            },
        ]
        .iter()
        .map(base_key)
        .collect();
        assert_eq!(keys.len(), 4);
        assert_ne!(
            base_key(&ResolvedBase::Scratch),
            step_key("", &run(""), &StageConfig::default(), None)
        );
    }
}
