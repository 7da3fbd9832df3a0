//! `arca-template`: Dockerfiles and E2B build steps to typed build plans,
//! build contexts and layer cache keys.
//!
//! [`parse`] turns a Dockerfile and its build arguments into a [`Dockerfile`]:
//! stages (multi-stage, `--platform`, `AS name`, global ARGs in FROM), each
//! a list of [`Step`]s with variables expanded where Docker expands them, and
//! the image configuration each stage ends with (ENV, WORKDIR, USER, the
//! start command from ENTRYPOINT and CMD, labels, ports, shell).
//! Parsing is pure: no file system, no network, deterministic.
//!
//! Supported: FROM, ARG, ENV, RUN (shell, exec and heredoc forms), COPY and
//! ADD (`--from`, `--chown`, `--chmod`, `--link`, exec form, heredocs), WORKDIR,
//! USER, CMD, ENTRYPOINT, LABEL, EXPOSE, SHELL, `\` continuations, comments,
//! the `# escape=` directive. HEALTHCHECK, STOPSIGNAL, VOLUME and MAINTAINER
//! are accepted and ignored with a [`Warning`]; ONBUILD and RUN flags
//! (`--mount`, `--network`...) are refused with a [`ParseError`].
//!
//! Not done by the parser: fetching ADD URLs and the base images' own
//! configuration (ENV from an image is unknown while parsing, so `$PATH` in
//! an ENV expands to the value set in this file only).
//!
//! Around the parser, for the builder (all pure logic or local files; no
//! sandbox, no network):
//! - [`e2b::plan`] turns the E2B SDK's build steps into the same plan;
//! - [`context`] unpacks uploaded archives safely, parses `.dockerignore`
//!   and resolves a COPY into the exact entries it writes
//!   ([`context::resolve_copy`]);
//! - [`cache`] computes layer cache keys from the parent, the step, the
//!   running configuration and the copied content.
//!
//! ```
//! use std::collections::BTreeMap;
//! use arca_template::{parse, Base, Instruction};
//!
//! let text = "ARG TAG=12\nFROM debian:${TAG}\nENV APP=/app\nWORKDIR $APP\nCMD [\"python3\", \"-m\", \"http.server\"]\n";
//! let args = BTreeMap::from([("TAG".to_owned(), "13".to_owned())]);
//! let plan = parse(text, &args)?;
//! assert_eq!(plan.target().base, Base::Image("debian:13".into()));
//! assert_eq!(plan.target().steps[1].instruction, Instruction::Workdir("/app".into()));
//! assert_eq!(plan.start_command().unwrap(), ["python3", "-m", "http.server"]);
//! # Ok::<(), arca_template::ParseError>(())
//! ```
#![forbid(unsafe_code)]

pub mod cache;
pub mod context;
pub mod e2b;
mod error;
mod expand;
mod lexer;
mod parse;
mod plan;

pub use error::{ParseError, ParseErrorKind};
pub use parse::{ImageConfigs, parse, parse_with_images};
pub use plan::{
    Base, Command, CopyFrom, CopySpec, DEFAULT_SHELL, Dockerfile, Instruction, Source, Stage,
    StageConfig, Step, Warning,
};
