//! E-mail endpoints: a run's end told by e-mail, through the SMTP server the operator names
//! (`notification.smtp_url`), to the addresses of the endpoint's `mailto:` URL.
//!
//! The message is plain text: how the run ended, its failed steps, and a link to it in the
//! dashboard when the notifier knows where that is. Its `Message-ID` is the event's id and the
//! endpoint's, the same on every retry, so a mail system can tell a retried message from a new
//! one; `Auto-Submitted: auto-generated` asks auto-responders not to answer it.
//!
//! Each recipient is sent the message in an SMTP transaction of its own, all at once (at most
//! ten transactions at once across deliveries), so a recipient the server refuses for good
//! (`550`, `551`, `553`) is dropped and the others still get it; when every one is refused so,
//! the delivery is given up (recorded as failed). Any other refusal, or a server out of reach,
//! retries the delivery on the schedule of every delivery: the retry goes only to the recipients
//! no earlier attempt settled (the notifier remembers, for up to [`SETTLED_KEPT`] messages at once,
//! who took each or was refused it for good); a retry taken by another notifier, or after a
//! restart, goes to every recipient again, under the same `Message-ID`. Credentials go only
//! over TLS (`smtps://`, or `?tls=required` for STARTTLS).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use hashlink::LinkedHashMap;
use lettre::address::Envelope;
use lettre::message::Mailbox;
use lettre::message::header::{ContentType, Header, HeaderName, HeaderValue};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;
use taskmesh_config::NotificationSettings;

use crate::{Outcome, Summary};

/// Sends e-mails through the operator's SMTP server.
pub(crate) struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    timeout: Duration,
    /// Transactions under way at once (lettre's pool bounds only its idle connections).
    connections: tokio::sync::Semaphore,
    /// The recipients earlier attempts at a message settled, by `Message-ID`, while it is retried.
    settled: Mutex<Settled>,
}

/// Messages whose settled recipients a notifier remembers at once, at most (those being sent,
/// waiting for a retry, or given up after a passing failure, which may be sent again on request).
pub(crate) const SETTLED_KEPT: usize = 10_000;

/// The recipients of messages being retried that earlier attempts settled: each took the message
/// or was refused it for good. Beyond [`SETTLED_KEPT`], the message noted least recently is
/// forgotten first (its retry then mails everyone again); a message every recipient settled is
/// forgotten at once.
#[derive(Default)]
struct Settled {
    /// Least recently noted first.
    by_message: LinkedHashMap<String, Recipients>,
}

#[derive(Default, Clone)]
struct Recipients {
    done: HashSet<String>,
    /// Those refused it for good, each with why (for the failure, should every one be); the
    /// rest of `done` took it.
    refused: Vec<(String, String)>,
}

impl Recipients {
    /// One of them took it.
    fn taken(&self) -> bool {
        self.done.len() > self.refused.len()
    }
}

/// Most bytes of why a recipient was refused that are kept (a server's reply may be long): ten
/// recipients' fit a recorded failure's error.
const REASON_BYTES: usize = 90;

impl Settled {
    /// Notes that `recipient` of message `id` took it, or was refused it for good (`refused`:
    /// why).
    fn note(&mut self, id: &str, recipient: &lettre::Address, refused: Option<&str>) {
        let recipients = self.by_message.entry(id.to_string()).or_insert_with(Recipients::default);
        if recipients.done.insert(recipient.to_string())
            && let Some(reason) = refused
        {
            recipients.refused.push((recipient.to_string(), reason.to_string()));
        }
        while self.by_message.len() > SETTLED_KEPT {
            self.by_message.pop_front();
        }
    }

    fn get(&self, id: &str) -> Option<&Recipients> {
        self.by_message.get(id)
    }

    fn forget(&mut self, id: &str) {
        self.by_message.remove(id);
    }
}

/// Most SMTP transactions (so connections) one notifier has under way at once.
const MAX_CONNECTIONS: usize = 10;

impl Mailer {
    /// None without `smtp_url`; an error names a setting that is wrong (never echoing the URL,
    /// which may hold a password). Called within a Tokio runtime (the connection pool starts a
    /// task of its own).
    pub fn new(settings: &NotificationSettings) -> anyhow::Result<Option<Self>> {
        let Some(url) = &settings.smtp_url else { return Ok(None) };
        let parsed =
            url::Url::parse(url.expose_secret()).map_err(|_| anyhow::anyhow!("notification.smtp_url is not a URL"))?;
        // lettre reads the first `tls` it finds.
        let tls = parsed.query_pairs().find(|(k, _)| k == "tls").map(|(_, v)| v.into_owned());
        let tls_required = parsed.scheme() == "smtps" || tls.as_deref() == Some("required");
        if (!parsed.username().is_empty() || parsed.password().is_some()) && !tls_required {
            // Over a plain (or opportunistic, which can be stripped) connection, the
            // credentials could be read on the way.
            anyhow::bail!("notification.smtp_url has credentials but no TLS: use smtps:// or add ?tls=required");
        }
        let from: Mailbox = settings
            .email_from
            .as_deref()
            .context("notification.email_from (the sender's address) is needed with notification.smtp_url")?
            .parse()
            .context("notification.email_from is not an address")?;
        let timeout = Duration::from_millis(settings.timeout_ms);
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose_secret())
            .map_err(|_| {
                anyhow::anyhow!(
                    "notification.smtp_url is not an SMTP URL (smtp://host:25, smtp://user:password@host:587?tls=required, smtps://user:password@host)"
                )
            })?
            .timeout(Some(timeout))
            .build();
        Ok(Some(Self {
            transport,
            from,
            timeout,
            connections: tokio::sync::Semaphore::new(MAX_CONNECTIONS),
            settled: Mutex::default(),
        }))
    }

    /// Sends `body` to `to` as `Message-ID: <{id}@taskmesh>`, one SMTP transaction per
    /// recipient, all at once (all named in `To:`), so that a server refusing one address does
    /// not keep the message from the others. Done when every recipient took it or was refused
    /// for good (a warning names those); retried when any was refused for now, or could not be
    /// reached, and then sent to those left, under the same `Message-ID`; refused when every one
    /// was refused for good.
    pub async fn send(&self, to: &[String], subject: &str, body: String, id: &str) -> Result<(), Outcome> {
        let mut message = Message::builder()
            .from(self.from.clone())
            .subject(subject)
            .message_id(Some(format!("<{id}@taskmesh>")))
            .header(ContentType::TEXT_PLAIN)
            .header(AutoSubmitted);
        let mut recipients = Vec::with_capacity(to.len());
        for address in to {
            let mailbox = address.parse::<Mailbox>().map_err(|e| Outcome::Refused(format!("'{address}': {e}")))?;
            recipients.push(mailbox.email.clone());
            message = message.to(mailbox);
        }
        let message = message.body(body).map_err(|e| Outcome::Refused(format!("building the e-mail: {e}")))?;
        let raw = message.formatted();
        let sender = Some(self.from.email.clone());
        let before = self.settled.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned();
        let before = before.unwrap_or_default();
        let left: Vec<_> = recipients.iter().filter(|r| !before.done.contains(&r.to_string())).collect();
        // All at once, each transaction bounded as a whole (lettre's own timeout covers
        // connecting only), over at most `MAX_CONNECTIONS` connections for all deliveries at
        // once (a wait for one is bounded by the delivery's own time limit). Each recipient
        // settled is noted as it is, so an attempt cut short still spares them on the retry.
        let sends = left.iter().map(|&recipient| {
            let (raw, sender) = (&raw, sender.clone());
            async move {
                let envelope = match Envelope::new(sender, vec![recipient.clone()]) {
                    Ok(envelope) => envelope,
                    Err(e) => return self.settle(id, recipient, Sent::Refused(format!("'{recipient}': {e}"))),
                };
                let _connection = self.connections.acquire().await.expect("the semaphore is never closed");
                let sent = match tokio::time::timeout(2 * self.timeout, self.transport.send_raw(&envelope, raw)).await {
                    Ok(Ok(_)) => Sent::Taken,
                    // A recipient the server will never take (no such mailbox, not relayed for
                    // us, a name it refuses): asking again changes nothing. Every other refusal
                    // (its authentication, TLS, a full mailbox, a policy) is the operator's or
                    // passing, and retried.
                    Ok(Err(e)) if e.status().is_some_and(|code| matches!(u16::from(code), 550 | 551 | 553)) => {
                        Sent::Refused(format!("'{recipient}': {e}"))
                    }
                    Ok(Err(e)) => Sent::Failed(format!("sending the e-mail to '{recipient}': {e}")),
                    Err(_) => {
                        Sent::Failed(format!("the SMTP server took over {:?} for '{recipient}'", 2 * self.timeout))
                    }
                };
                self.settle(id, recipient, sent)
            }
        });
        // Those refused for good by earlier attempts (and still recipients) count toward
        // "every recipient" too.
        let mut taken = before.taken();
        let addresses: HashSet<String> = recipients.iter().map(ToString::to_string).collect();
        let earlier = before.refused.into_iter().filter(|(a, _)| addresses.contains(a));
        let (mut refused, mut failed) = (earlier.map(|(_, why)| why).collect::<Vec<_>>(), None);
        for sent in futures::future::join_all(sends).await {
            match sent {
                Sent::Taken => taken = true,
                Sent::Refused(reason) => refused.push(reason),
                Sent::Failed(reason) => {
                    failed.get_or_insert(reason);
                }
            }
        }
        // Failed: the retry asks only those left. Otherwise the message is done with.
        if let Some(reason) = failed {
            return Err(Outcome::Failed(reason));
        }
        self.settled.lock().unwrap_or_else(|e| e.into_inner()).forget(id);
        if !taken {
            return Err(Outcome::Refused(format!("the SMTP server refused every recipient: {}", refused.join("; "))));
        }
        if !refused.is_empty() {
            tracing::warn!(refused = %refused.join("; "), "the SMTP server refused some recipients for good; the others have the e-mail");
        }
        Ok(())
    }

    /// Notes a recipient the attempt settled (took the message, or was refused it for good).
    /// A refusal's reason is cut to [`REASON_BYTES`].
    fn settle(&self, id: &str, recipient: &lettre::Address, mut sent: Sent) -> Sent {
        let refused = match &mut sent {
            Sent::Failed(_) => return sent,
            Sent::Taken => None,
            Sent::Refused(reason) => {
                taskmesh_events::truncate_at_char(reason, REASON_BYTES);
                Some(reason.as_str())
            }
        };
        self.settled.lock().unwrap_or_else(|e| e.into_inner()).note(id, recipient, refused);
        sent
    }
}

/// What became of the message for one recipient.
enum Sent {
    Taken,
    /// Refused for good.
    Refused(String),
    /// Refused for now, or not sent.
    Failed(String),
}

/// `Auto-Submitted: auto-generated` (RFC 3834).
#[derive(Debug, Clone)]
struct AutoSubmitted;

impl Header for AutoSubmitted {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Auto-Submitted")
    }

    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Self)
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "auto-generated".to_string())
    }
}

/// The subject and body of the e-mail for a run's end.
pub(crate) fn text(s: &Summary, dashboard: Option<&url::Url>) -> (String, String) {
    // A subject is one line.
    let line = crate::one_line;
    let status = s.status.replace('_', " ");
    let (subject, mut body) = match s.workflow.as_deref().map(line) {
        Some(workflow) => {
            (format!("[Taskmesh] {workflow} {status}"), format!("The run {} of {workflow} {status}.\n", s.run_id))
        }
        None => (format!("[Taskmesh] run {} {status}", s.run_id), format!("The run {} {status}.\n", s.run_id)),
    };
    if !s.failed_steps.is_empty() {
        let steps: Vec<String> = s.failed_steps.iter().map(|step| line(step)).collect();
        body.push_str(&format!("Failed steps: {}\n", steps.join(", ")));
    }
    if let Some(dashboard) = dashboard {
        body.push_str(&format!("\n{}\n", crate::run_page(dashboard, &s.run_id)));
    }
    (subject, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_email_says_how_the_run_ended_and_links_to_it() {
        let summary = Summary {
            workflow: Some("deploy\nprod".into()),
            run_id: "01a2-run".into(),
            status: "timed_out".into(),
            failed_steps: vec!["test".into(), "lint".into()],
        };
        let dashboard = url::Url::parse("https://tm.example/ui/").unwrap();
        let (subject, body) = text(&summary, Some(&dashboard));
        assert_eq!(subject, "[Taskmesh] deploy prod timed out");
        assert_eq!(
            body,
            "The run 01a2-run of deploy prod timed out.\nFailed steps: test, lint\n\nhttps://tm.example/ui/#/runs/01a2-run\n"
        );
        let plain = Summary { workflow: None, failed_steps: vec![], status: "succeeded".into(), ..summary };
        assert_eq!(
            text(&plain, None),
            ("[Taskmesh] run 01a2-run succeeded".into(), "The run 01a2-run succeeded.\n".into())
        );
    }

    /// The bound counts messages still being sent or retried: those done with (forgotten) do
    /// not push out one that waits for its retry, however many went before it.
    #[test]
    fn the_settled_recipients_of_a_waiting_message_outlast_many_done_with() {
        let to: lettre::Address = "ops@example.com".parse().unwrap();
        let mut settled = Settled::default();
        settled.note("waiting", &to, None);
        for n in 0..2 * SETTLED_KEPT {
            let id = format!("done-{n}");
            settled.note(&id, &to, Some("550 no such mailbox"));
            settled.forget(&id);
        }
        assert!(settled.get("waiting").is_some_and(|r| r.taken() && r.done.contains("ops@example.com")));
        // Beyond the bound, the one noted least recently goes first: noted again (a retry's
        // next recipient), "waiting" outlasts "older", noted after it the first time.
        settled.note("older", &to, None);
        settled.note("waiting", &"later@example.com".parse().unwrap(), None);
        for n in 0..SETTLED_KEPT - 1 {
            settled.note(&format!("retried-{n}"), &to, None);
        }
        assert!(settled.get("older").is_none());
        assert_eq!(settled.get("waiting").map(|r| r.done.len()), Some(2));
        assert_eq!(settled.by_message.len(), SETTLED_KEPT);
    }

    // The transport's connection pool starts a task: a Tokio runtime is needed.
    #[tokio::test]
    async fn a_wrong_smtp_setting_is_named_without_its_password() {
        let mut settings = NotificationSettings::default();
        assert!(Mailer::new(&settings).unwrap().is_none(), "no server: no mailer");
        settings.smtp_url = Some("smtps://user:hunter2@mail.example.com".into());
        let err = Mailer::new(&settings).err().unwrap().to_string();
        assert!(err.contains("notification.email_from"), "{err}");
        settings.email_from = Some("Taskmesh <tm@example.com>".into());
        assert!(Mailer::new(&settings).unwrap().is_some());
        for wrong in [
            "ftp://user:hunter2@mail.example.com",
            "smtp://user:hunter2@mail.example.com:587",
            "smtp://user:hunter2@mail.example.com:587?tls=opportunistic",
            "smtp://user:hunter2@mail.example.com:587?tls=opportunistic&tls=required",
        ] {
            settings.smtp_url = Some(wrong.into());
            let err = format!("{:#}", Mailer::new(&settings).err().unwrap());
            assert!(err.contains("notification.smtp_url") && !err.contains("hunter2"), "{wrong}: {err}");
        }
        for right in ["smtp://user:hunter2@mail.example.com:587?tls=required", "smtp://relay.internal:25"] {
            settings.smtp_url = Some(right.into());
            assert!(Mailer::new(&settings).unwrap().is_some(), "{right}");
        }
    }
}
