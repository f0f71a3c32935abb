//! The audit log: one JSON line per admin action (who created which sale, who
//! credited whom, when, and how it ended), including attempts
//! refused for want of the admin role. It is kept apart from the application
//! logs (JSON on stdout): on stderr by default, or appended to the file
//! `AUDIT_LOG` names. It holds names, ids and amounts, never a token, secret or
//! request header.

use std::io::Write;

use parking_lot::Mutex;
use serde::Serialize;

/// Where audit records go.
pub struct AuditLog {
    sink: Mutex<Box<dyn Write + Send>>,
}

/// One admin action.
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    /// RFC 3339, UTC.
    pub at: String,
    /// The token's subject.
    pub actor: &'a str,
    /// Whether the caller had the admin role.
    pub admin: bool,
    /// `create_item`, `top_up`, or the refused route or RPC.
    pub action: &'a str,
    /// The item or user acted on.
    pub target: &'a str,
    /// `OK`, or the reason code the caller got.
    pub outcome: &'a str,
    /// What was asked (stock, price, amount, key), never credentials.
    pub details: serde_json::Value,
}

impl AuditLog {
    /// `-` or empty: stderr; anything else: a file, created if missing and
    /// appended to.
    pub fn open(setting: &str) -> std::io::Result<Self> {
        let sink: Box<dyn Write + Send> = match setting.trim() {
            "" | "-" => Box::new(std::io::stderr()),
            path => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        };
        Ok(Self { sink: Mutex::new(sink) })
    }

    /// Writes `record` as one line and flushes it (admin actions are rare; an
    /// audit record that waits in a buffer can be lost with the process).
    pub fn record(&self, record: &AuditRecord<'_>) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(error) => {
                tracing::error!(%error, "an audit record could not be encoded");
                return;
            }
        };
        line.push(b'\n');
        let mut sink = self.sink.lock();
        if let Err(error) = sink.write_all(&line).and_then(|()| sink.flush()) {
            metrics::counter!("flashsale_audit_write_errors_total").increment(1);
            tracing::error!(%error, "an audit record could not be written");
        }
    }
}

/// Now, for [`AuditRecord::at`].
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// An amount as the audit log records it: `{"currency", "amount_minor"}`, or null.
pub fn money(amount: Option<&flashsale_proto::common::v1::Money>) -> serde_json::Value {
    amount.map_or(
        serde_json::Value::Null,
        |m| serde_json::json!({"currency": m.currency, "amount_minor": m.amount_minor}),
    )
}
