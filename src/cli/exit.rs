//! Exit statuses: a script can tell a wrong command line from a bad file from a failure while
//! running, and a run stopped by a signal from all three.

use std::fmt;
use std::process::ExitCode;

/// What went wrong, as the exit status tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Something failed while running (an engine error, a write that failed, not enough memory).
    Runtime,
    /// The command line asks for something impossible: a bad option value, options that do not
    /// go together, an output path that cannot be written. Clap's own parse errors use the same
    /// status.
    Usage,
    /// An input file is missing, unreadable or not what it should be: a model, a configuration,
    /// a tokenizer, a text, a prompts file, a report to convert.
    BadInput,
}

impl Failure {
    /// The exit status.
    pub fn code(self) -> u8 {
        match self {
            Failure::Runtime => 1,
            Failure::Usage => 2,
            Failure::BadInput => 3,
        }
    }
}

/// The exit statuses, as `--help` lists them.
pub const EXIT_STATUS_HELP: &str = "Exit status:
  0        success
  1        failure while running
  2        usage error (bad option value, options that conflict, unwritable output path)
  3        bad input file (model, configuration, tokenizer, text, prompts, report)
  128+N    stopped by signal N after finishing cleanly (130: SIGINT, 143: SIGTERM)";

/// An error marked with its [`Failure`]; it prints as the error it wraps.
#[derive(Debug)]
struct Classified {
    failure: Failure,
    error: anyhow::Error,
}

impl fmt::Display for Classified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

// No `source`: the message above already holds the whole chain.
impl std::error::Error for Classified {}

/// Marks errors with the [`Failure`] they stand for.
pub trait Classify<T> {
    /// The error is the command line's fault.
    fn usage(self) -> anyhow::Result<T>;
    /// The error is an input file's fault.
    fn bad_input(self) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> Classify<T> for Result<T, E> {
    fn usage(self) -> anyhow::Result<T> {
        self.map_err(|e| classify(e.into(), Failure::Usage))
    }

    fn bad_input(self) -> anyhow::Result<T> {
        self.map_err(|e| classify(e.into(), Failure::BadInput))
    }
}

fn classify(error: anyhow::Error, failure: Failure) -> anyhow::Error {
    // The innermost mark wins: it was made where the cause was known.
    if failure_of(&error).is_some() {
        return error;
    }
    anyhow::Error::new(Classified { failure, error })
}

/// A usage error with this message.
pub fn usage(message: impl fmt::Display) -> anyhow::Error {
    classify(anyhow::anyhow!("{message}"), Failure::Usage)
}

fn failure_of(error: &anyhow::Error) -> Option<Failure> {
    error
        .chain()
        .find_map(|c| c.downcast_ref::<Classified>())
        .map(|c| c.failure)
}

/// The exit status for `error`: its mark, or [`Failure::Runtime`].
pub fn exit_code(error: &anyhow::Error) -> ExitCode {
    ExitCode::from(failure_of(error).unwrap_or(Failure::Runtime).code())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn marks_survive_context_and_print_unchanged() {
        let e: anyhow::Result<()> = Err(anyhow::anyhow!("tensor `w` has shape [2], expected [3]"));
        let e = e
            .context("in model.safetensors")
            .bad_input()
            .context("headless run")
            .unwrap_err();
        assert_eq!(failure_of(&e), Some(Failure::BadInput));
        assert_eq!(
            format!("{e:#}"),
            "headless run: in model.safetensors: tensor `w` has shape [2], expected [3]"
        );
        assert_eq!(exit_code(&e), ExitCode::from(3));
    }

    #[test]
    fn the_innermost_mark_wins_and_unmarked_is_runtime() {
        let e = Err::<(), _>(usage("--batch must be at least 1"))
            .bad_input()
            .unwrap_err();
        assert_eq!(failure_of(&e), Some(Failure::Usage));
        assert_eq!(exit_code(&anyhow::anyhow!("disk full")), ExitCode::from(1));
        let codes: Vec<u8> = [Failure::Runtime, Failure::Usage, Failure::BadInput]
            .iter()
            .map(|f| f.code())
            .collect();
        assert_eq!(codes, [1, 2, 3]);
    }
}
