//! What the CLI prints: one line per event, as text (coloured only when asked or when stdout is
//! a terminal) or as one JSON object (`--json`). While `chat` edits a line, lines go through
//! the line editor's printer so that they appear above the prompt instead of inside it.

use std::io::{IsTerminal as _, Write as _};
use std::sync::Mutex;

use anstyle::{AnsiColor, Style};
use serde_json::Value;

/// `--color`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// Colour when stdout is a terminal and NO_COLOR is not set.
    Auto,
    Always,
    Never,
}

/// Where text lines go.
type Printer = Box<dyn FnMut(String) -> bool + Send>;

pub struct Output {
    json: bool,
    color: bool,
    /// Set while a line editor owns the terminal; returns false once it cannot print.
    printer: Mutex<Option<Printer>>,
}

/// The few styles of the CLI.
#[derive(Clone, Copy)]
pub enum Tone {
    /// Who said something.
    Who,
    /// A toast.
    Toast,
    /// Bookkeeping: states, hints.
    Dim,
    Good,
    Bad,
}

impl Output {
    pub fn new(json: bool, color: ColorChoice) -> Self {
        let color = match color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        };
        Output {
            json,
            color: color && !json,
            printer: Mutex::new(None),
        }
    }

    pub fn json(&self) -> bool {
        self.json
    }

    /// `text` in `tone`, when colour is on.
    pub fn paint(&self, tone: Tone, text: &str) -> String {
        if !self.color {
            return text.to_owned();
        }
        let style = match tone {
            Tone::Who => Style::new().bold().fg_color(Some(AnsiColor::Cyan.into())),
            Tone::Toast => Style::new().fg_color(Some(AnsiColor::Yellow.into())),
            Tone::Dim => Style::new().dimmed(),
            Tone::Good => Style::new().fg_color(Some(AnsiColor::Green.into())),
            Tone::Bad => Style::new().bold().fg_color(Some(AnsiColor::Red.into())),
        };
        format!("{style}{text}{style:#}")
    }

    /// One event: `text` in text mode, `json` with `--json`. Only the one that is printed is
    /// built.
    pub fn event(&self, text: impl FnOnce() -> String, json: impl FnOnce() -> Value) {
        if self.json {
            self.raw_line(&json().to_string());
        } else {
            self.raw_line(&text());
        }
    }

    /// A line of text that only text mode shows (hints, confirmations).
    pub fn note(&self, text: impl FnOnce() -> String) {
        if !self.json {
            self.raw_line(&text());
        }
    }

    /// Prints `line` as it is.
    pub fn raw_line(&self, line: &str) {
        let mut printer = crate::cli::lock(&self.printer);
        if let Some(print) = printer.as_mut() {
            if print(format!("{line}\n")) {
                return;
            }
            *printer = None;
        }
        let mut stdout = std::io::stdout().lock();
        // A closed stdout (a pipe whose reader left) is no reason to stop the session.
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    }

    /// A fatal error: always on stderr as text; also as a JSON event with `--json`.
    pub fn error(&self, message: &str) {
        if self.json {
            self.raw_line(&serde_json::json!({"event": "error", "message": message}).to_string());
        }
        eprintln!("confab: {message}");
    }

    /// Routes text lines through `printer` until it fails or [`Output::clear_printer`].
    pub fn set_printer(&self, printer: Printer) {
        *crate::cli::lock(&self.printer) = Some(printer);
    }

    /// Stops printing through the line editor.
    pub fn clear_printer(&self) {
        crate::cli::lock(&self.printer).take();
    }
}
