//! `arca completion <shell>`: prints a completion script, generated from
//! the same definitions as `--help`.

use std::process::ExitCode;

/// Options of `arca completion`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// bash, zsh, fish, elvish or powershell.
    shell: clap_complete::Shell,
}

pub(crate) fn run(args: &Args, mut cmd: clap::Command) -> anyhow::Result<ExitCode> {
    let name = cmd.get_name().to_string();
    let mut buf = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, name, &mut buf);
    super::quiet_pipe(
        std::io::Write::write_all(&mut std::io::stdout().lock(), &buf)
            .map(|()| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
    )
}
