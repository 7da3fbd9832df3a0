//! E2B build steps (the SDK's `Template` builder) as a build plan.
//!
//! The SDKs send a base (`fromImage` or `fromTemplate`) and a list of
//! `TemplateStep`s; [`plan`] turns them into the same [`Dockerfile`] plan a
//! Dockerfile parses into, one stage, so the builder has one executor for
//! both. Each step keeps its 1-based index as [`Step::line`]: that is how
//! the API names a failing step.
//!
//! | `type` | `args` | becomes |
//! | --- | --- | --- |
//! | `RUN` | `[command]` or `[command, user]` | [`Instruction::Run`], shell form with [`E2B_SHELL`]; `user` for this step only |
//! | `COPY` | `[src, dest]`, `[src, dest, user]` or `[src, dest, user, mode]` (`""` = unset) | [`Instruction::Copy`] from [`CopyFrom::Files`] (the step's `filesHash`) |
//! | `ENV` | `[k1, v1, k2, v2, ...]` | [`Instruction::Env`] |
//! | `WORKDIR` | `[path]` | [`Instruction::Workdir`], resolved against the previous one |
//! | `USER` | `[user]` | [`Instruction::User`] |
//!
//! What E2B does differently from a Dockerfile, and the builder must keep:
//! - ENV values are kept as sent, `$VAR` included: E2B evaluates each value
//!   in the build sandbox (`printf "<value>"` through the shell), so
//!   `PATH=/opt/bin:$PATH` extends the image's own PATH;
//! - COPY without a user gives the files to the step's current user, not
//!   root, and a wildcard source keeps the matched paths below the
//!   wildcard's directory (see [`CopyFrom::Files`]);
//! - a relative COPY destination with no WORKDIR set is relative to the
//!   user's home directory.
//!
//! Start and ready commands are not steps: they come with the build
//! request, so the plan's start command is `None`.

use crate::context::parse_chmod;
use crate::plan::{
    Base, Command, CopyFrom, CopySpec, Dockerfile, Instruction, Source, Stage, StageConfig, Step,
};

/// The shell E2B runs RUN commands with (a login shell, so profile scripts
/// set PATH as in an interactive session).
pub const E2B_SHELL: [&str; 3] = ["/bin/bash", "-l", "-c"];

/// One build step as the SDKs send it (`TemplateStep`), read from the
/// request by the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct E2bStep {
    /// `type`: `COPY`, `ENV`, `RUN`, `WORKDIR` or `USER` (any case).
    pub kind: String,
    /// `args`, per the table in the module docs.
    pub args: Vec<String>,
    /// `filesHash`: for COPY, the hash the files were uploaded under.
    pub files_hash: Option<String>,
    /// `force`: rebuild this step and the ones after it even when cached.
    pub force: bool,
}

/// An E2B step that cannot be turned into a plan: always bad user input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("step {step}: {kind}")]
pub struct E2bError {
    /// 1-based index of the step among the user steps.
    pub step: usize,
    /// What is wrong with it.
    pub kind: E2bErrorKind,
}

/// What is wrong with an E2B step. Each message ends with what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum E2bErrorKind {
    /// Not one of the five step types.
    #[error("unknown step type `{kind}`; use COPY, ENV, RUN, WORKDIR or USER")]
    UnknownType {
        /// The type as sent.
        kind: String,
    },
    /// Too few or too many arguments.
    #[error("{kind} takes {expected} but got {got}; check the SDK version")]
    ArgCount {
        /// The step type, upper case.
        kind: &'static str,
        /// What it takes.
        expected: &'static str,
        /// How many came.
        got: usize,
    },
    /// A required argument is empty.
    #[error("{kind} has an empty {what}; give one")]
    EmptyArg {
        /// The step type, upper case.
        kind: &'static str,
        /// Which argument.
        what: &'static str,
    },
    /// COPY without `filesHash`.
    #[error("COPY has no filesHash, so its files are unknown; upload them with the SDK's copy()")]
    MissingFilesHash,
    /// COPY with a mode that is not octal.
    #[error("COPY mode `{mode}` is not an octal mode; give one such as 0755")]
    BadMode {
        /// The mode as sent.
        mode: String,
    },
    /// An ENV name that is empty or holds `=`.
    #[error("ENV name `{name}` is not valid; use a non-empty name without `=`")]
    BadEnvName {
        /// The name as sent.
        name: String,
    },
}

/// Turns an E2B base and steps into a one-stage plan.
///
/// The stage starts from `base` (normally [`Base::Image`] or
/// [`Base::Template`]) with an empty configuration but the shell
/// [`E2B_SHELL`]; the configuration then follows the steps (ENV, WORKDIR,
/// USER) as a Dockerfile's does. Steps' `force` carries over to
/// [`Step::force`].
///
/// # Errors
///
/// An [`E2bError`] naming the first invalid step by its 1-based index: an
/// unknown type, a wrong number of arguments, an empty command, path or
/// user, COPY without `filesHash`, a bad COPY mode or ENV name.
pub fn plan(base: Base, steps: &[E2bStep]) -> Result<Dockerfile, E2bError> {
    let mut config = StageConfig {
        shell: E2B_SHELL.iter().map(|s| (*s).to_owned()).collect(),
        ..StageConfig::default()
    };
    let mut out = Vec::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        let line = i + 1;
        let instruction =
            instruction(step, &mut config).map_err(|kind| E2bError { step: line, kind })?;
        out.push(Step {
            line,
            instruction,
            force: step.force,
        });
    }
    Ok(Dockerfile {
        global_args: Default::default(),
        stages: vec![Stage {
            index: 0,
            name: None,
            base,
            platform: None,
            // No FROM line: the base is the step the API calls `base`.
            line: 0,
            steps: out,
            config,
        }],
        warnings: Vec::new(),
    })
}

fn instruction(step: &E2bStep, config: &mut StageConfig) -> Result<Instruction, E2bErrorKind> {
    let args = step.args.as_slice();
    let count = |kind, expected| E2bErrorKind::ArgCount {
        kind,
        expected,
        got: args.len(),
    };
    let empty = |kind, what| E2bErrorKind::EmptyArg { kind, what };
    match step.kind.to_ascii_uppercase().as_str() {
        "RUN" => {
            let (command, user) = match args {
                [command] => (command, None),
                [command, user] => (command, Some(user)),
                _ => return Err(count("RUN", "a command and optionally a user")),
            };
            if command.trim().is_empty() {
                return Err(empty("RUN", "command"));
            }
            Ok(Instruction::Run {
                command: Command::Shell {
                    shell: config.shell.clone(),
                    script: command.clone(),
                },
                // The SDK sends no user rather than an empty one; treat
                // both alike.
                user: user.filter(|u| !u.is_empty()).cloned(),
            })
        }
        "COPY" => {
            if !(2..=4).contains(&args.len()) {
                return Err(count(
                    "COPY",
                    "a source, a destination, optionally a user and a mode",
                ));
            }
            let (src, dest) = (&args[0], &args[1]);
            let user = args.get(2).filter(|u| !u.is_empty());
            let mode = args.get(3).filter(|m| !m.is_empty());
            if src.is_empty() {
                return Err(empty("COPY", "source"));
            }
            if dest.is_empty() {
                return Err(empty("COPY", "destination"));
            }
            let hash = step
                .files_hash
                .as_ref()
                .filter(|h| !h.is_empty())
                .ok_or(E2bErrorKind::MissingFilesHash)?;
            if let Some(mode) = mode {
                parse_chmod(mode).map_err(|_| E2bErrorKind::BadMode { mode: mode.clone() })?;
            }
            Ok(Instruction::Copy(CopySpec {
                sources: vec![Source::Path(src.clone())],
                dest: dest.clone(),
                from: Some(CopyFrom::Files(hash.clone())),
                chown: user.cloned(),
                chmod: mode.cloned(),
            }))
        }
        "ENV" => {
            if args.is_empty() || args.len() % 2 != 0 {
                return Err(count("ENV", "name and value pairs"));
            }
            let mut pairs = Vec::with_capacity(args.len() / 2);
            for kv in args.chunks_exact(2) {
                let (k, v) = (&kv[0], &kv[1]);
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    return Err(E2bErrorKind::BadEnvName { name: k.clone() });
                }
                match config.env.iter_mut().find(|(ek, _)| ek == k) {
                    Some(slot) => slot.1.clone_from(v),
                    None => config.env.push((k.clone(), v.clone())),
                }
                pairs.push((k.clone(), v.clone()));
            }
            Ok(Instruction::Env(pairs))
        }
        "WORKDIR" => {
            let [path] = args else {
                return Err(count("WORKDIR", "one path"));
            };
            if path.is_empty() {
                return Err(empty("WORKDIR", "path"));
            }
            let base = config.workdir.as_deref().unwrap_or("/");
            let dir = crate::parse::resolve_path(base, path);
            config.workdir = Some(dir.clone());
            Ok(Instruction::Workdir(dir))
        }
        "USER" => {
            let [user] = args else {
                return Err(count("USER", "one user"));
            };
            if user.is_empty() {
                return Err(empty("USER", "user"));
            }
            config.user = Some(user.clone());
            Ok(Instruction::User(user.clone()))
        }
        _ => Err(E2bErrorKind::UnknownType {
            kind: step.kind.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(kind: &str, args: &[&str]) -> E2bStep {
        E2bStep {
            kind: kind.into(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            files_hash: None,
            force: false,
        }
    }

    fn copy(args: &[&str], hash: &str) -> E2bStep {
        E2bStep {
            files_hash: Some(hash.into()),
            ..step("COPY", args)
        }
    }

    fn bash() -> Vec<String> {
        E2B_SHELL.iter().map(|s| (*s).to_owned()).collect()
    }

    fn err(steps: &[E2bStep]) -> E2bError {
        plan(Base::Image("e2bdev/base".into()), steps).unwrap_err()
    }

    #[test]
    fn steps_become_a_one_stage_plan() {
        let steps = [
            step("RUN", &["apt-get update && apt-get install -y vim"]),
            step("run", &["echo hi", "root"]),
            copy(&["app", "/app/", "user:user", "0755"], "h1"),
            copy(&["req.txt", "req.txt", "", ""], "h2"),
            step("ENV", &["A", "1", "P", "/x:$PATH", "A", "2"]),
            step("WORKDIR", &["/app"]),
            step("WORKDIR", &["sub/../src"]),
            E2bStep {
                force: true,
                ..step("USER", &["user"])
            },
        ];
        let d = plan(Base::Template("base".into()), &steps).unwrap();
        assert_eq!(d.stages.len(), 1);
        let stage = d.target();
        assert_eq!(stage.base, Base::Template("base".into()));
        assert_eq!(d.start_command(), None);
        let got: Vec<(usize, &Instruction, bool)> = stage
            .steps
            .iter()
            .map(|s| (s.line, &s.instruction, s.force))
            .collect();
        assert_eq!(got.len(), 8);
        assert_eq!(
            got[0],
            (
                1,
                &Instruction::Run {
                    command: Command::Shell {
                        shell: bash(),
                        script: "apt-get update && apt-get install -y vim".into()
                    },
                    user: None
                },
                false
            )
        );
        assert_eq!(
            got[1].1,
            &Instruction::Run {
                command: Command::Shell {
                    shell: bash(),
                    script: "echo hi".into()
                },
                user: Some("root".into())
            }
        );
        assert_eq!(
            got[2].1,
            &Instruction::Copy(CopySpec {
                sources: vec![Source::Path("app".into())],
                dest: "/app/".into(),
                from: Some(CopyFrom::Files("h1".into())),
                chown: Some("user:user".into()),
                chmod: Some("0755".into()),
            })
        );
        assert_eq!(
            got[3].1,
            &Instruction::Copy(CopySpec {
                sources: vec![Source::Path("req.txt".into())],
                dest: "req.txt".into(),
                from: Some(CopyFrom::Files("h2".into())),
                chown: None,
                chmod: None,
            })
        );
        assert_eq!(
            got[4].1,
            &Instruction::Env(vec![
                ("A".into(), "1".into()),
                ("P".into(), "/x:$PATH".into()),
                ("A".into(), "2".into()),
            ])
        );
        assert_eq!(got[6].1, &Instruction::Workdir("/app/src".into()));
        assert_eq!(got[7], (8, &Instruction::User("user".into()), true));
        assert_eq!(
            stage.config,
            StageConfig {
                env: vec![("A".into(), "2".into()), ("P".into(), "/x:$PATH".into())],
                workdir: Some("/app/src".into()),
                user: Some("user".into()),
                shell: bash(),
                ..StageConfig::default()
            }
        );
        assert_eq!(stage.line, 0);
    }

    #[test]
    fn copy_takes_two_to_four_args() {
        let d = plan(Base::Scratch, &[copy(&["a", "/b"], "h")]).unwrap();
        let Instruction::Copy(spec) = &d.target().steps[0].instruction else {
            panic!()
        };
        assert_eq!((spec.chown.as_ref(), spec.chmod.as_ref()), (None, None));
        let d = plan(Base::Scratch, &[copy(&["a", "/b", "app"], "h")]).unwrap();
        let Instruction::Copy(spec) = &d.target().steps[0].instruction else {
            panic!()
        };
        assert_eq!(spec.chown.as_deref(), Some("app"));
    }

    #[test]
    fn empty_steps_give_an_empty_stage() {
        let d = plan(Base::Image("python:3".into()), &[]).unwrap();
        assert!(d.target().steps.is_empty());
        assert_eq!(d.target().config.shell, bash());
    }

    #[test]
    fn every_error_names_its_step() {
        let ok = step("RUN", &["true"]);
        let cases: Vec<(E2bStep, E2bErrorKind)> = vec![
            (
                step("ADD", &["x", "y"]),
                E2bErrorKind::UnknownType { kind: "ADD".into() },
            ),
            (
                step("RUN", &[]),
                E2bErrorKind::ArgCount {
                    kind: "RUN",
                    expected: "a command and optionally a user",
                    got: 0,
                },
            ),
            (
                step("RUN", &["a", "b", "c"]),
                E2bErrorKind::ArgCount {
                    kind: "RUN",
                    expected: "a command and optionally a user",
                    got: 3,
                },
            ),
            (
                step("RUN", &["  "]),
                E2bErrorKind::EmptyArg {
                    kind: "RUN",
                    what: "command",
                },
            ),
            (
                copy(&["a"], "h"),
                E2bErrorKind::ArgCount {
                    kind: "COPY",
                    expected: "a source, a destination, optionally a user and a mode",
                    got: 1,
                },
            ),
            (
                copy(&["a", "b", "", "", "x"], "h"),
                E2bErrorKind::ArgCount {
                    kind: "COPY",
                    expected: "a source, a destination, optionally a user and a mode",
                    got: 5,
                },
            ),
            (
                copy(&["", "/b", "", ""], "h"),
                E2bErrorKind::EmptyArg {
                    kind: "COPY",
                    what: "source",
                },
            ),
            (
                copy(&["a", "", "", ""], "h"),
                E2bErrorKind::EmptyArg {
                    kind: "COPY",
                    what: "destination",
                },
            ),
            (
                step("COPY", &["a", "/b", "", ""]),
                E2bErrorKind::MissingFilesHash,
            ),
            (
                copy(&["a", "/b", "", ""], ""),
                E2bErrorKind::MissingFilesHash,
            ),
            (
                copy(&["a", "/b", "", "rwx"], "h"),
                E2bErrorKind::BadMode { mode: "rwx".into() },
            ),
            (
                copy(&["a", "/b", "", "0999"], "h"),
                E2bErrorKind::BadMode {
                    mode: "0999".into(),
                },
            ),
            (
                copy(&["a", "/b", "", "17777"], "h"),
                E2bErrorKind::BadMode {
                    mode: "17777".into(),
                },
            ),
            (
                step("ENV", &[]),
                E2bErrorKind::ArgCount {
                    kind: "ENV",
                    expected: "name and value pairs",
                    got: 0,
                },
            ),
            (
                step("ENV", &["A", "1", "B"]),
                E2bErrorKind::ArgCount {
                    kind: "ENV",
                    expected: "name and value pairs",
                    got: 3,
                },
            ),
            (
                step("ENV", &["", "1"]),
                E2bErrorKind::BadEnvName { name: "".into() },
            ),
            (
                step("ENV", &["A=B", "1"]),
                E2bErrorKind::BadEnvName { name: "A=B".into() },
            ),
            (
                step("WORKDIR", &[]),
                E2bErrorKind::ArgCount {
                    kind: "WORKDIR",
                    expected: "one path",
                    got: 0,
                },
            ),
            (
                step("WORKDIR", &[""]),
                E2bErrorKind::EmptyArg {
                    kind: "WORKDIR",
                    what: "path",
                },
            ),
            (
                step("USER", &["a", "b"]),
                E2bErrorKind::ArgCount {
                    kind: "USER",
                    expected: "one user",
                    got: 2,
                },
            ),
            (
                step("USER", &[""]),
                E2bErrorKind::EmptyArg {
                    kind: "USER",
                    what: "user",
                },
            ),
        ];
        for (bad, kind) in cases {
            // Two good steps first: the error names step 3.
            let e = err(&[ok.clone(), ok.clone(), bad.clone(), ok.clone()]);
            assert_eq!(e, E2bError { step: 3, kind }, "{bad:?}");
            assert!(e.to_string().starts_with("step 3: "), "{e}");
        }
    }

    #[test]
    fn error_messages_say_what_to_do() {
        assert_eq!(
            err(&[step("COPY", &["a", "/b"])]).to_string(),
            "step 1: COPY has no filesHash, so its files are unknown; upload them with the SDK's copy()"
        );
        assert_eq!(
            err(&[step("FROM", &["x"])]).to_string(),
            "step 1: unknown step type `FROM`; use COPY, ENV, RUN, WORKDIR or USER"
        );
    }
}
