//! Which database errors are worth retrying: one classification for every
//! service, so inventory and wallet cannot disagree about a restarted server.
//!
//! The classes that mean "the server or the link failed, not this request"
//! are PostgreSQL's SQLSTATE classes 08 (connection exception), 40
//! (transaction rollback: serialization failure, deadlock), 53 (insufficient
//! resources: too many connections, out of memory, disk full) and 57 (operator
//! intervention: admin shutdown, crash shutdown, cannot connect now, query
//! cancelled), plus the driver's own connection errors.
//!
//! diesel-async 0.9 keeps the SQLSTATE to itself: it maps a handful of codes
//! onto [`DatabaseErrorKind`] variants (40001 becomes `SerializationFailure`)
//! and reports every other code as `Unknown`, with no way to read the code back
//! from the boxed [`diesel::result::DatabaseErrorInformation`]. A socket that
//! died (the server restarted) has no SQLSTATE at all and arrives as
//! `UnableToSendCommand`. So the kinds come first, and for `Unknown` the
//! server's primary message is matched against the fixed English texts that
//! PostgreSQL sends for the transient codes (its `lc_messages` must then be
//! English or C, the default; a translated server degrades to "permanent",
//! which the consumers turn into a dead-lettered message rather than a lost one).

use diesel::result::{DatabaseErrorKind, Error};

/// PostgreSQL's primary messages for the transient SQLSTATEs we can meet,
/// matched as prefixes (some carry details after them).
const TRANSIENT_MESSAGES: &[(&str, &str)] = &[
    ("40P01", "deadlock detected"),
    ("55P03", "could not obtain lock on"),
    ("53300", "sorry, too many clients already"),
    ("53300", "remaining connection slots are reserved"),
    ("53200", "out of memory"),
    ("53100", "could not extend file"),
    ("57014", "canceling statement due to statement timeout"),
    ("57014", "canceling statement due to lock timeout"),
    ("57014", "canceling statement due to user request"),
    ("57P01", "terminating connection due to administrator command"),
    ("57P02", "terminating connection because of crash of another server process"),
    ("57P03", "the database system is starting up"),
    ("57P03", "the database system is shutting down"),
    ("57P03", "the database system is in recovery mode"),
    ("57P03", "the database system is not yet accepting connections"),
    ("57P03", "the database system is not accepting connections"),
    ("08006", "server closed the connection unexpectedly"),
    ("08006", "connection closed"),
    ("25P03", "terminating connection due to idle-in-transaction timeout"),
];

/// Whether `error` may succeed if the same statement is tried again later
/// (the server restarted, failed over, was overloaded or chose this
/// transaction as a deadlock victim). Everything else is permanent: a
/// constraint, a malformed value, a bug.
pub fn is_transient(error: &Error) -> bool {
    match error {
        Error::DatabaseError(kind, info) => match kind {
            DatabaseErrorKind::ClosedConnection
            | DatabaseErrorKind::UnableToSendCommand
            | DatabaseErrorKind::SerializationFailure
            // A standby promoted or the primary demoted to read-only under us.
            | DatabaseErrorKind::ReadOnlyTransaction => true,
            DatabaseErrorKind::Unknown => transient_sqlstate(info.message()).is_some(),
            _ => false,
        },
        // The transaction manager lost track of the connection (it died mid-transaction).
        Error::BrokenTransactionManager => true,
        _ => false,
    }
}

/// The SQLSTATE that PostgreSQL sends with `message`, when it is one of the
/// transient ones we know.
pub fn transient_sqlstate(message: &str) -> Option<&'static str> {
    TRANSIENT_MESSAGES.iter().find(|(_, text)| message.starts_with(text)).map(|(code, _)| *code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(kind: DatabaseErrorKind, message: &str) -> Error {
        Error::DatabaseError(kind, Box::new(message.to_owned()))
    }

    #[test]
    fn connection_and_conflict_errors_are_transient() {
        let transient = [
            db(DatabaseErrorKind::UnableToSendCommand, "Connection closed"),
            db(DatabaseErrorKind::ClosedConnection, "closed"),
            db(DatabaseErrorKind::SerializationFailure, "could not serialize access"),
            db(DatabaseErrorKind::ReadOnlyTransaction, "cannot execute UPDATE in a read-only transaction"),
            db(DatabaseErrorKind::Unknown, "terminating connection due to administrator command"),
            db(DatabaseErrorKind::Unknown, "the database system is shutting down"),
            db(DatabaseErrorKind::Unknown, "the database system is starting up"),
            db(DatabaseErrorKind::Unknown, "deadlock detected"),
            db(DatabaseErrorKind::Unknown, "canceling statement due to statement timeout"),
            db(DatabaseErrorKind::Unknown, "sorry, too many clients already"),
            Error::BrokenTransactionManager,
        ];
        for error in &transient {
            assert!(is_transient(error), "{error:?} should be transient");
        }
    }

    #[test]
    fn request_errors_are_permanent() {
        let permanent = [
            db(DatabaseErrorKind::UniqueViolation, "duplicate key value violates unique constraint"),
            db(DatabaseErrorKind::CheckViolation, "new row violates check constraint"),
            db(DatabaseErrorKind::ForeignKeyViolation, "insert or update violates foreign key constraint"),
            db(DatabaseErrorKind::NotNullViolation, "null value in column"),
            db(DatabaseErrorKind::Unknown, "value too long for type character varying(64)"),
            db(DatabaseErrorKind::Unknown, "relation \"orders\" does not exist"),
            Error::NotFound,
            Error::RollbackTransaction,
        ];
        for error in &permanent {
            assert!(!is_transient(error), "{error:?} should be permanent");
        }
    }

    #[test]
    fn known_messages_name_their_sqlstate() {
        assert_eq!(transient_sqlstate("terminating connection due to administrator command"), Some("57P01"));
        assert_eq!(transient_sqlstate("deadlock detected"), Some("40P01"));
        assert_eq!(transient_sqlstate("syntax error at or near \"SELEC\""), None);
    }
}
