//! The one error of this crate: a Dockerfile that cannot be turned into a plan.

/// A Dockerfile was refused: the 1-based `line` where the offending
/// instruction starts, and what is wrong with it.
///
/// This is always bad user input (an API maps it to a 4xx); parsing touches
/// no file system or network and has no other failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Dockerfile line {line}: {kind}")]
pub struct ParseError {
    /// 1-based line number of the instruction (its first line when it is
    /// continued with `\` or followed by heredocs).
    pub line: usize,
    /// What is wrong.
    pub kind: ParseErrorKind,
}

/// What is wrong with a Dockerfile line. Each message ends with what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseErrorKind {
    /// The text has no instruction at all.
    #[error(
        "the Dockerfile has no FROM instruction; start it with `FROM <image>` or `FROM scratch`"
    )]
    NoFrom,
    /// An instruction other than ARG comes before the first FROM.
    #[error(
        "{instruction} comes before the first FROM; only ARG may precede FROM, so move it after FROM"
    )]
    BeforeFrom {
        /// The instruction, upper case.
        instruction: String,
    },
    /// Not a Dockerfile instruction.
    #[error(
        "unknown instruction `{name}`; check its spelling (instructions are FROM, ARG, ENV, RUN, COPY, ADD, WORKDIR, USER, CMD, ENTRYPOINT, LABEL, EXPOSE, SHELL)"
    )]
    UnknownInstruction {
        /// The word as written.
        name: String,
    },
    /// A Dockerfile instruction Arca templates refuse.
    #[error("{instruction} is not supported by Arca templates; {hint}")]
    Unsupported {
        /// The instruction, upper case.
        instruction: String,
        /// What to do instead.
        hint: &'static str,
    },
    /// The instruction lacks its arguments.
    #[error("{instruction} needs {expected}; add it")]
    MissingArgument {
        /// The instruction, upper case.
        instruction: String,
        /// What is expected, e.g. "a source and a destination".
        expected: &'static str,
    },
    /// Extra words after a complete instruction.
    #[error("{instruction} has unexpected extra text `{text}`; remove it or quote it")]
    ExtraArgument {
        /// The instruction, upper case.
        instruction: String,
        /// The first unexpected word.
        text: String,
    },
    /// A `--flag` the instruction does not take (or Arca does not support).
    #[error("{instruction} does not support the flag `{flag}`; remove it")]
    UnsupportedFlag {
        /// The instruction, upper case.
        instruction: String,
        /// The flag as written.
        flag: String,
    },
    /// A `--flag` given twice, or without its `=value`.
    #[error(
        "{instruction} flag `{flag}` is malformed or repeated; write it once as `{flag}=<value>`"
    )]
    BadFlag {
        /// The instruction, upper case.
        instruction: String,
        /// The flag name.
        flag: String,
    },
    /// A word that should be `KEY=VALUE`.
    #[error(
        "`{word}` in {instruction} is not KEY=VALUE; write KEY=VALUE, quoting values that contain spaces"
    )]
    NotKeyValue {
        /// The instruction, upper case.
        instruction: String,
        /// The word as written.
        word: String,
    },
    /// An empty or malformed variable name.
    #[error(
        "`{name}` is not a valid {instruction} name; use letters, digits and `_`, not starting with a digit"
    )]
    BadName {
        /// The instruction, upper case.
        instruction: String,
        /// The name as written.
        name: String,
    },
    /// A quote is never closed.
    #[error("a {quote} quote is never closed; close it or escape it with the escape character")]
    UnterminatedQuote {
        /// `'` or `"`.
        quote: char,
    },
    /// A `${` without its `}` or with an unknown operator.
    #[error(
        "bad variable substitution `{text}`; use $VAR, ${{VAR}}, ${{VAR:-default}} or ${{VAR:+alternative}}"
    )]
    BadSubstitution {
        /// The substitution as written.
        text: String,
    },
    /// `${VAR:?message}` (or `${VAR?message}`) with VAR unset.
    #[error(
        "variable {name} is required: {message}; pass it as a build argument or declare it with ARG"
    )]
    RequiredVariable {
        /// The variable.
        name: String,
        /// The message written after `?`.
        message: String,
    },
    /// A heredoc whose delimiter line never comes.
    #[error(
        "heredoc `<<{delimiter}` is never closed; end it with a line containing only `{delimiter}`"
    )]
    UnterminatedHeredoc {
        /// The delimiter word.
        delimiter: String,
    },
    /// A parser directive (`# escape=...`) with a bad value or given twice.
    #[error(
        "bad parser directive `{directive}`; use `# escape=\\` or `# escape=`` once, on the first lines"
    )]
    BadDirective {
        /// The directive line.
        directive: String,
    },
    /// An instruction that needs the JSON (exec) form got the shell form.
    #[error("{instruction} needs the JSON form, e.g. {instruction} [\"/bin/bash\", \"-c\"]")]
    ExecFormRequired {
        /// The instruction, upper case.
        instruction: String,
    },
    /// A FROM with an empty image after expansion.
    #[error(
        "FROM names no image (`{text}` expands to nothing); give an image, a stage name or `scratch`, or pass the build argument"
    )]
    EmptyImage {
        /// The image word as written.
        text: String,
    },
    /// A bad `AS name` in FROM.
    #[error(
        "`{name}` is not a valid stage name; use a letter followed by letters, digits, `-`, `_` or `.`"
    )]
    BadStageName {
        /// The name as written.
        name: String,
    },
    /// Two stages with one name.
    #[error("stage name `{name}` is already used by an earlier FROM; pick another name")]
    DuplicateStage {
        /// The name, lower case.
        name: String,
    },
    /// `--from=<n>` naming the current or a later stage.
    #[error(
        "--from={reference} refers to this or a later stage; COPY --from can only use earlier stages"
    )]
    StageNotYetBuilt {
        /// The reference as written.
        reference: String,
    },
    /// A bad EXPOSE port.
    #[error(
        "`{port}` is not a valid port; write PORT, PORT/tcp, PORT/udp or a range like 8000-8010"
    )]
    BadPort {
        /// The port as written.
        port: String,
    },
}
