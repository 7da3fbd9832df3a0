//! The typed build plan a Dockerfile parses into.

use std::collections::BTreeMap;

/// A parsed Dockerfile: its stages in order, the last one being the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// ARGs declared before the first FROM, with their values after build
    /// argument overrides (`None`: declared without default and not passed).
    pub global_args: BTreeMap<String, Option<String>>,
    /// The stages, in file order; never empty.
    pub stages: Vec<Stage>,
    /// Instructions accepted but ignored, and similar notes for the user.
    pub warnings: Vec<Warning>,
}

impl Dockerfile {
    /// The stage the template is made of: the last one.
    pub fn target(&self) -> &Stage {
        self.stages
            .last()
            .expect("parse refuses a Dockerfile without FROM, so there is a stage")
    }

    /// The stage called `name` (stage names are case-insensitive).
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        let name = name.to_ascii_lowercase();
        self.stages
            .iter()
            .find(|s| s.name.as_deref() == Some(name.as_str()))
    }

    /// The template's start command: the target stage's
    /// [`Stage::start_command`].
    pub fn start_command(&self) -> Option<Vec<String>> {
        self.target().start_command()
    }
}

/// A note about an accepted instruction that has no effect in Arca.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// 1-based line.
    pub line: usize,
    /// What was ignored and why.
    pub message: String,
}

/// One `FROM` and the steps that follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// 0-based position in the file (what `--from=<n>` refers to).
    pub index: usize,
    /// `AS name`, lower-cased.
    pub name: Option<String>,
    /// What the stage starts from.
    pub base: Base,
    /// `--platform=`, expanded, if given.
    pub platform: Option<String>,
    /// 1-based line of the FROM.
    pub line: usize,
    /// The build steps, in order.
    pub steps: Vec<Step>,
    /// Image configuration at the end of the stage (inherited from the base
    /// stage for `FROM <stage>`; empty for images, whose own config is only
    /// known after the pull).
    pub config: StageConfig,
}

impl Stage {
    /// The process a sandbox of this stage starts: ENTRYPOINT followed by
    /// CMD as Docker combines them (a shell-form ENTRYPOINT ignores CMD).
    pub fn start_command(&self) -> Option<Vec<String>> {
        match (&self.config.entrypoint, &self.config.cmd) {
            (Some(entry @ Command::Shell { .. }), _) => Some(entry.argv()),
            (Some(entry), Some(cmd)) => {
                let mut argv = entry.argv();
                argv.extend(cmd.argv());
                Some(argv)
            }
            (Some(entry), None) => Some(entry.argv()),
            (None, Some(cmd)) => Some(cmd.argv()),
            (None, None) => None,
        }
    }
}

/// The base of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// `FROM scratch`: an empty file system.
    Scratch,
    /// A registry image reference, as written after expansion.
    Image(String),
    /// An earlier stage, by index.
    Stage(usize),
    /// Another Arca template (E2B's `fromTemplate`), by the reference the
    /// caller gives: its name, or the build the api resolved it to. The
    /// plan does not interpret it. A Dockerfile never produces this: its
    /// FROM names images and stages only.
    Template(String),
}

/// Image configuration accumulated by a stage's instructions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageConfig {
    /// ENV, in first-set order; a later ENV replaces the value in place.
    pub env: Vec<(String, String)>,
    /// WORKDIR, absolute.
    pub workdir: Option<String>,
    /// USER, as written after expansion (`name`, `uid`, `name:group`...).
    pub user: Option<String>,
    /// CMD.
    pub cmd: Option<Command>,
    /// ENTRYPOINT.
    pub entrypoint: Option<Command>,
    /// LABELs.
    pub labels: BTreeMap<String, String>,
    /// EXPOSEd ports, normalized to `port/proto` (or `from-to/proto`), unique.
    pub exposed: Vec<String>,
    /// The shell for shell-form RUN, CMD and ENTRYPOINT (SHELL).
    pub shell: Vec<String>,
}

/// The shell Docker uses on Linux when no SHELL is given.
pub const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];

/// One instruction of a stage and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Where the step comes from: the 1-based line where it starts in a
    /// Dockerfile, or the 1-based step index for E2B steps (the index the
    /// API reports a failing step by).
    pub line: usize,
    /// What it does.
    pub instruction: Instruction,
    /// Run this step (and so every later one) even when the layer cache has
    /// it: E2B's per-step `force` (`skip_cache()` in the SDK). Always false
    /// for Dockerfile steps. Not part of the cache key: a forced step is
    /// rebuilt and its result may replace the cached layer.
    pub force: bool,
}

/// A build-plan instruction, with variables already expanded where Docker
/// expands them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// `ARG name[=default]`: the value in effect (build argument, default or
    /// the global ARG's value); `None` when unset.
    Arg {
        /// Variable name.
        name: String,
        /// Its value for this build.
        value: Option<String>,
    },
    /// `ENV`: the pairs it sets, in order.
    Env(Vec<(String, String)>),
    /// `LABEL`: the pairs it sets, in order.
    Label(Vec<(String, String)>),
    /// `RUN`, or E2B's `RUN` step.
    Run {
        /// What to run.
        command: Command,
        /// Run as this user (`name`, `uid`, `name:group`...) instead of the
        /// stage's current USER, for this step only: E2B's `[command, user]`
        /// (the SDK's `run_cmd(..., user=...)`). Always `None` for
        /// Dockerfile RUN, which has no such flag.
        user: Option<String>,
    },
    /// `COPY`.
    Copy(CopySpec),
    /// `ADD` (URLs and archive extraction are the builder's business).
    Add(CopySpec),
    /// `WORKDIR`, resolved to an absolute path against the previous one.
    Workdir(String),
    /// `USER`.
    User(String),
    /// `CMD`.
    Cmd(Command),
    /// `ENTRYPOINT`.
    Entrypoint(Command),
    /// `EXPOSE`, normalized as in [`StageConfig::exposed`].
    Expose(Vec<String>),
    /// `SHELL`: the new shell.
    Shell(Vec<String>),
}

/// A command of RUN, CMD or ENTRYPOINT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Shell form: `script` is run as `shell... script`. The script is not
    /// expanded (the shell does it). For `RUN <<EOF` alone, the script is the
    /// heredoc body; for `RUN cmd <<EOF`, the heredocs are kept in the script
    /// for the shell to read.
    Shell {
        /// The shell in effect (SHELL, or [`DEFAULT_SHELL`]).
        shell: Vec<String>,
        /// The command text.
        script: String,
    },
    /// Exec (JSON) form: the argv, not expanded.
    Exec(Vec<String>),
}

impl Command {
    /// The argv to execute.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Command::Shell { shell, script } => {
                let mut argv = shell.clone();
                argv.push(script.clone());
                argv
            }
            Command::Exec(argv) => argv.clone(),
        }
    }
}

/// The operands of COPY and ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// Sources, in order (paths may hold globs; [`crate::context::resolve_copy`]
    /// matches them and applies `.dockerignore`).
    pub sources: Vec<Source>,
    /// Destination, expanded; a trailing `/` means a directory.
    pub dest: String,
    /// `--from=`: where sources are read from (default: the build context).
    pub from: Option<CopyFrom>,
    /// `--chown=`, expanded ([`crate::context::parse_chown`] splits it).
    pub chown: Option<String>,
    /// `--chmod=`, expanded ([`crate::context::parse_chmod`] reads it).
    pub chmod: Option<String>,
}

/// A COPY or ADD source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A path (or glob, or URL for ADD) as written, expanded.
    Path(String),
    /// A heredoc (`COPY <<EOF /dest`): a file named after the delimiter.
    /// The content is expanded unless the delimiter was quoted.
    Inline {
        /// The delimiter, used as the file name.
        name: String,
        /// File content.
        content: String,
    },
}

/// Where `COPY --from=` reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyFrom {
    /// An earlier stage, by index.
    Stage(usize),
    /// An image reference.
    Image(String),
    /// The archive an E2B COPY step uploaded, by its `filesHash`. The
    /// archive holds the matched files at their paths relative to the SDK's
    /// context directory; the builder unpacks it
    /// ([`crate::context::unpack_upload`]) and resolves the step's source
    /// against that directory ([`crate::context::resolve_copy`]).
    ///
    /// E2B differs from Docker in two ways the builder keeps:
    /// - with `chown: None` the files belong to the user the step runs as
    ///   (the stage's current USER), not to root;
    /// - a glob source keeps the matched paths relative to the glob's
    ///   directory (`src/**/*.py` to `/app/` gives `/app/a/b.py`) instead of
    ///   flattening them as Docker does; [`crate::context::resolve_copy`]
    ///   does this for `Files` specs.
    Files(String),
}
