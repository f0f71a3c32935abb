//! gRPC statuses with machine-readable reasons (`google.rpc.ErrorInfo`), the
//! encoding every service uses for the error table in proto/README.md ("Errors").

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.domain` of every reason we emit.
pub const ERROR_DOMAIN: &str = "flashsale";

/// A status whose `ErrorInfo.reason` is `reason`. `message` is shown to clients:
/// it must never carry internal error text.
pub fn rejection(code: Code, reason: &'static str, message: impl Into<String>) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, std::collections::HashMap::new()),
    )
}

/// The UNAVAILABLE status: a dependency is down, the call changed nothing, and
/// retrying (with the same idempotency key) is safe.
pub fn unavailable() -> Status {
    rejection(Code::Unavailable, "UNAVAILABLE", "service temporarily unavailable; retry with the same idempotency key")
}

/// INVALID_ARGUMENT naming the offending field, as a `google.rpc.BadRequest`
/// field violation beside the `ErrorInfo`, so clients can point at the field.
pub fn invalid_argument(field: &str, description: &str) -> Status {
    let mut details = ErrorDetails::with_error_info("INVALID_ARGUMENT", ERROR_DOMAIN, std::collections::HashMap::new());
    details.add_bad_request_violation(field, description);
    Status::with_error_details(Code::InvalidArgument, format!("invalid {field}: {description}"), details)
}

/// INTERNAL with a generic message; the cause must be logged by the caller.
pub fn internal() -> Status {
    rejection(Code::Internal, "INTERNAL", "internal error")
}
