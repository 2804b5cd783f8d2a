//! `confab chat [TO]`: an interactive chat on one call. With TO it places the call; without,
//! it answers the first call that comes in. On a terminal the line is edited with rustyline,
//! whose hint hook sees every keystroke: a line that stops being empty turns our composing
//! state on (the library refreshes it), emptying it turns it off, sending ends it. Incoming
//! messages, the remote's typing, delivery marks (✓, or ✗ with the reason) and the call's state
//! changes are printed above the prompt. `/quit` or Ctrl-D terminates the call and signs out;
//! when the call ends by itself (the other side hung up), Enter leaves, so that the line editor
//! gives the terminal back itself.
//! Off a terminal (or with `--json`) it reads plain lines from stdin, for scripts.

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::anyhow;
use confab_client::protocol::sdp::DEFAULT_ACCEPT_TYPE;
use confab_client::{
    AutoAcceptPolicy, CallEstablishOptions, Conversation, InstantMessagingCall, Toast,
};
use futures::StreamExt as _;
use rustyline::error::ReadlineError;
use rustyline::history::DefaultHistory;
use rustyline::{Editor, ExternalPrinter as _};
use serde_json::json;
use tokio::sync::mpsc;

use super::out::{Output, Tone};
use super::session::{self, Session};

const PROMPT: &str = "> ";

/// What the input side tells the chat loop.
enum Input {
    Line(String),
    /// The line being edited became non-empty (true) or empty again (false).
    Composing(bool),
    /// Ctrl-D, Ctrl-C, or end of input.
    End,
}

pub async fn run(
    session: &Session,
    out: &Arc<Output>,
    to: Option<String>,
    toast: Option<String>,
) -> anyhow::Result<ExitCode> {
    let endpoint = session.sign_in_resumable(AutoAcceptPolicy::Notify).await?;
    let link_events = session::print_link_events(&endpoint, Arc::clone(out));
    let call = match open_call(&endpoint, out, to.as_deref(), toast).await {
        Ok(call) => call,
        Err(e) => {
            let _ = endpoint.bye().await;
            return Err(e);
        }
    };
    let follower = tokio::spawn(follow(call.clone(), Arc::clone(out)));

    let (input_tx, mut input) = mpsc::unbounded_channel();
    let interactive =
        !out.json() && std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let editor = if interactive {
        Terminal::start(out, input_tx.clone())
            .inspect_err(|e| tracing::warn!(error = %e, "no line editing"))
            .ok()
    } else {
        None
    };
    let terminal = editor.unwrap_or_else(|| {
        spawn_plain_input(input_tx);
        Terminal::none()
    });
    out.note(|| {
        out.paint(
            Tone::Dim,
            &format!(
                "chatting with {} on call {}; /quit or Ctrl-D to leave",
                peer(&call),
                call.id()
            ),
        )
    });

    // Messages go out one after the other, in the order typed, on a task of their own so that
    // the prompt never waits for a delivery.
    let (lines_tx, lines_rx) = mpsc::unbounded_channel::<String>();
    let sender = tokio::spawn(send_lines(call.clone(), Arc::clone(out), lines_rx));
    let ended = {
        let call = call.clone();
        async move {
            let _ = call.terminated().await;
        }
    };
    tokio::pin!(ended);
    let ctrl_c = session::interrupted();
    tokio::pin!(ctrl_c);
    let mut ending = Ending::Local;
    loop {
        tokio::select! {
            event = input.recv() => match event {
                Some(Input::Line(line)) => match line.trim() {
                    "/quit" | "/exit" => break,
                    "" => {}
                    command if command.starts_with('/') && !command.starts_with("//") => {
                        out.note(|| out.paint(Tone::Dim, "commands: /quit (or Ctrl-D); start a message with // to send a leading /"));
                    }
                    _ => {
                        let text = line.strip_prefix('/').filter(|l| l.starts_with('/')).unwrap_or(&line);
                        let _ = lines_tx.send(text.to_owned());
                    }
                },
                Some(Input::Composing(active)) => {
                    if let Err(e) = call.flow().set_composing(active) {
                        tracing::debug!(error = %e, "composing not sent");
                    }
                }
                Some(Input::End) | None => break,
            },
            () = &mut ended => {
                ending = Ending::CallEnded;
                break;
            }
            _ = &mut ctrl_c => {
                ending = Ending::Signal;
                break;
            }
        }
    }
    // Let what was typed before /quit be delivered (or fail) first.
    drop(lines_tx);
    let _ = sender.await;
    if ending != Ending::CallEnded
        && let Err(e) = call.terminate().await
    {
        tracing::debug!(error = %e, "terminate failed");
    }
    if let Err(e) = endpoint.bye().await {
        tracing::debug!(error = %e, "bye failed");
    }
    // bye closed the connection, so the follower has seen the call's last state, and every
    // link event is printed.
    let _ = follower.await;
    let _ = link_events.await;
    terminal.finish(out, ending).await;
    Ok(ExitCode::SUCCESS)
}

/// The call to chat on: placed to `to`, or the first one that comes in; established.
async fn open_call(
    endpoint: &confab_client::Endpoint,
    out: &Arc<Output>,
    to: Option<&str>,
    toast: Option<String>,
) -> anyhow::Result<InstantMessagingCall> {
    match to {
        Some(to) => {
            session::decline_incoming(endpoint, Arc::clone(out));
            let toast = toast.map(|text| Toast {
                content_type: DEFAULT_ACCEPT_TYPE.to_owned(),
                body: text.as_str().into(),
            });
            out.note(|| out.paint(Tone::Dim, &format!("calling {to}…")));
            let call = InstantMessagingCall::begin_establish(
                &Conversation::new(endpoint),
                to,
                toast,
                CallEstablishOptions::default(),
            )
            .await
            .map_err(|e| session::call_error(to, e))?;
            // The states up to established, as they come; the follower takes over after.
            let mut changes = call.state_changes();
            let printer = Arc::clone(out);
            let id = call.id().to_owned();
            let early = tokio::spawn(async move {
                while let Some(change) = changes.next().await {
                    let established = change.state == confab_client::CallState::Established;
                    session::print_state(&printer, &id, &change);
                    if established {
                        return;
                    }
                }
            });
            let result = call.established().await;
            let _ = early.await;
            result.map_err(|e| session::call_error(to, e))?;
            session::answered_by(&call).await;
            Ok(call)
        }
        None => {
            out.note(|| out.paint(Tone::Dim, "waiting for a call…"));
            let mut incoming = endpoint.incoming_calls();
            let call = incoming
                .recv()
                .await
                .ok_or_else(|| anyhow!("the connection to the node closed"))?;
            session::print_incoming(out, &call);
            // One chat at a time: later calls are declined (486), freeing their forks.
            let later = Arc::clone(out);
            tokio::spawn(async move {
                while let Some(other) = incoming.recv().await {
                    session::print_incoming(&later, &other);
                    let _ = other.decline(None).await;
                }
            });
            call.accept()
                .await
                .map_err(|e| anyhow!("could not accept the call from {}: {e}", call.peer()))?;
            session::answered_by(&call).await;
            Ok(call)
        }
    }
}

/// The other user: who answered, or who the call was for.
fn peer(call: &InstantMessagingCall) -> String {
    call.remote()
        .map_or_else(|| call.peer().to_owned(), |r| r.user)
}

/// Prints the call's life once established: its state changes (skipping those `open_call`
/// printed), messages, the remote typing, and a transfer's new remote.
async fn follow(call: InstantMessagingCall, out: Arc<Output>) {
    let id = call.id().to_owned();
    let mut changes = call.state_changes();
    let mut messages = call.flow().received();
    let mut typing = call.flow().remote_composing();
    let mut snapshots = call.watch();
    let mut remote = call.remote();
    let mut past_establishment = false;
    let (mut changes_open, mut messages_open) = (true, true);
    // The watch channels live as long as the call object; the two streams end with the call.
    while changes_open || messages_open {
        tokio::select! {
            biased;
            change = changes.next(), if changes_open => {
                let Some(change) = change else {
                    changes_open = false;
                    continue;
                };
                if session::ends_the_call(&change) {
                    for message in session::ready_messages(&mut messages, &mut messages_open) {
                        session::print_message(&out, &id, &message);
                    }
                }
                if past_establishment || call.direction() == confab_client::Direction::Inbound {
                    session::print_state(&out, &id, &change);
                }
                if change.state == confab_client::CallState::Established {
                    past_establishment = true;
                }
            }
            message = messages.recv(), if messages_open => match message {
                Some(message) => session::print_message(&out, &id, &message),
                None => messages_open = false,
            },
            Ok(()) = typing.changed() => {
                let active = *typing.borrow_and_update();
                if active {
                    out.event(
                        || out.paint(Tone::Dim, &format!("{} is typing…", peer(&call))),
                        || json!({"event": "composing", "call": id, "from": peer(&call), "active": true}),
                    );
                } else if out.json() {
                    out.raw_line(&json!({"event": "composing", "call": id, "from": peer(&call), "active": false}).to_string());
                }
            }
            Ok(()) = snapshots.changed() => {
                let now = snapshots.borrow_and_update().remote.clone();
                if now != remote && remote.is_some() && let Some(new) = &now {
                    out.event(
                        || out.paint(Tone::Dim, &format!("call {id} transferred: now chatting with {} ({})", new.user, new.endpoint)),
                        || json!({"event": "transferred", "call": id, "remote": new}),
                    );
                }
                remote = now;
            }
        }
    }
}

/// Sends each line in order, printing its delivery mark.
async fn send_lines(
    call: InstantMessagingCall,
    out: Arc<Output>,
    mut lines: mpsc::UnboundedReceiver<String>,
) {
    let flow = call.flow();
    while let Some(text) = lines.recv().await {
        match flow.send_text(&text).await {
            Ok(msg) => out.event(
                || format!("{} {text}", out.paint(Tone::Good, "✓")),
                || json!({"event": "delivered", "call": call.id(), "msg": msg, "text": text}),
            ),
            Err(e) => {
                let why = session::delivery_error(&e);
                out.event(
                    || {
                        format!(
                            "{} {text} {}",
                            out.paint(Tone::Bad, "✗"),
                            out.paint(Tone::Bad, &format!("({why})"))
                        )
                    },
                    || {
                        json!({"event": "failed", "call": call.id(), "msg": null, "text": text,
                               "code": e.code(), "reason": why})
                    },
                );
            }
        }
    }
}

/// Plain lines from stdin; its end is the end of the chat.
fn spawn_plain_input(tx: mpsc::UnboundedSender<Input>) {
    let mut lines = session::stdin_lines();
    tokio::spawn(async move {
        while let Some(line) = lines.recv().await {
            if tx.send(Input::Line(line)).is_err() {
                return;
            }
        }
        let _ = tx.send(Input::End);
    });
}

/// The line editor's hooks: the hint hook runs on every edit and is where typing is seen.
struct ChatHelper {
    typing: Arc<AtomicBool>,
    tx: mpsc::UnboundedSender<Input>,
}

impl rustyline::hint::Hinter for ChatHelper {
    type Hint = String;

    fn hint(&self, line: &str, _pos: usize, _ctx: &rustyline::Context<'_>) -> Option<String> {
        let now = !line.trim().is_empty();
        if self.typing.swap(now, Ordering::SeqCst) != now {
            let _ = self.tx.send(Input::Composing(now));
        }
        None
    }
}

impl rustyline::completion::Completer for ChatHelper {
    type Candidate = String;
}
impl rustyline::highlight::Highlighter for ChatHelper {}
impl rustyline::validate::Validator for ChatHelper {}
impl rustyline::Helper for ChatHelper {}

/// The terminal while the line editor runs on its own thread, and how it is given back.
struct Terminal {
    #[cfg(unix)]
    saved: Option<nix::sys::termios::Termios>,
    editor: Option<EditorThread>,
}

struct EditorThread {
    /// Tells the thread to stop after the line being edited instead of prompting again.
    stop: Arc<AtomicBool>,
    /// Completes once the thread has returned the terminal (rustyline restores its mode).
    done: tokio::sync::oneshot::Receiver<()>,
}

/// Why the chat ends, which decides how the terminal is given back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// `/quit`, Ctrl-D, Ctrl-C in the editor, or the end of input.
    Local,
    /// The call ended by itself (the other side hung up, say) while a line may be in edit.
    CallEnded,
    /// SIGTERM or SIGINT.
    Signal,
}

impl Terminal {
    fn none() -> Self {
        Terminal {
            #[cfg(unix)]
            saved: None,
            editor: None,
        }
    }

    /// Starts the line editor on a thread; its lines and typing go to `tx`, and `out` prints
    /// above its prompt from now on. The thread stops by itself after `/quit` or Ctrl-D.
    fn start(out: &Arc<Output>, tx: mpsc::UnboundedSender<Input>) -> anyhow::Result<Self> {
        #[cfg(unix)]
        let saved = nix::sys::termios::tcgetattr(std::io::stdin()).ok();
        let typing = Arc::new(AtomicBool::new(false));
        let mut editor = Editor::<ChatHelper, DefaultHistory>::new()?;
        editor.set_helper(Some(ChatHelper {
            typing: Arc::clone(&typing),
            tx: tx.clone(),
        }));
        let mut printer = editor.create_external_printer()?;
        out.set_printer(Box::new(move |line| printer.print(line).is_ok()));
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                typing.store(false, Ordering::SeqCst);
                match editor.readline(PROMPT) {
                    Ok(line) => {
                        let was_typing = typing.swap(false, Ordering::SeqCst);
                        if line.trim().is_empty() && was_typing {
                            let _ = tx.send(Input::Composing(false));
                        }
                        let quit = matches!(line.trim(), "/quit" | "/exit");
                        let _ = editor.add_history_entry(line.as_str());
                        if tx.send(Input::Line(line)).is_err() || quit {
                            break;
                        }
                    }
                    // Ctrl-D, Ctrl-C, or a terminal error: the chat is over.
                    Err(ReadlineError::Eof | ReadlineError::Interrupted) | Err(_) => {
                        let _ = tx.send(Input::End);
                        break;
                    }
                }
            }
            let _ = done_tx.send(());
        });
        Ok(Terminal {
            #[cfg(unix)]
            saved,
            editor: Some(EditorThread { stop, done }),
        })
    }

    /// Gives the terminal back. After `/quit` or Ctrl-D the editor has already stopped; when
    /// the call ended by itself the editor still waits for a line, so the user is asked for
    /// one; after a signal there is no waiting, and the saved terminal mode is put back.
    async fn finish(self, out: &Output, ending: Ending) {
        let Some(mut editor) = self.editor else {
            return;
        };
        editor.stop.store(true, Ordering::SeqCst);
        let running = matches!(
            editor.done.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        );
        if running && ending == Ending::Signal {
            out.clear_printer();
            #[cfg(unix)]
            if let Some(saved) = &self.saved {
                let _ = nix::sys::termios::tcsetattr(
                    std::io::stdin(),
                    nix::sys::termios::SetArg::TCSANOW,
                    saved,
                );
            }
            // Over the abandoned prompt.
            let mut stdout = std::io::stdout().lock();
            let _ = write!(stdout, "\r\x1b[2K");
            let _ = stdout.flush();
            return;
        }
        if running {
            if ending == Ending::CallEnded {
                out.note(|| out.paint(Tone::Dim, "the call has ended; press Enter to leave"));
            }
            let _ = editor.done.await;
        }
        out.clear_printer();
    }
}
