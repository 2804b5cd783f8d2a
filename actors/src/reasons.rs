//! The reasons of the contract's table (§4 "Reasons"), one constructor per cause, so every
//! actor words the same cause the same way.

use confab_protocol::Reason;

/// `message_failed` texts of protocol.md §6, shared by the leg and, for legs on other nodes,
/// the endpoint.
pub const CALL_DOES_NOT_EXIST: &str = "Call Leg/Transaction Does Not Exist";
pub const REQUEST_TIMEOUT: &str = "Request Timeout";

/// The `result` label of `confab_messages_total` for a failure code, without allocating for
/// the codes the node sends.
pub fn message_result_label(code: u16) -> std::borrow::Cow<'static, str> {
    match code {
        408 => "408".into(),
        413 => "413".into(),
        415 => "415".into(),
        481 => "481".into(),
        503 => "503".into(),
        other => other.to_string().into(),
    }
}

pub fn terminated_locally() -> Reason {
    Reason::new(200, "Terminated locally")
}
pub fn terminated_remotely() -> Reason {
    Reason::new(200, "Terminated remotely")
}
pub fn completed_elsewhere() -> Reason {
    Reason::new(200, "Call completed elsewhere")
}
pub fn request_terminated() -> Reason {
    Reason::new(487, "Request Terminated")
}
pub fn declined_elsewhere() -> Reason {
    Reason::new(603, "Declined elsewhere")
}
pub fn temporarily_unavailable() -> Reason {
    Reason::new(480, "Temporarily Unavailable")
}
pub fn not_acceptable_here() -> Reason {
    Reason::new(488, "Not Acceptable Here")
}
pub fn moved_temporarily() -> Reason {
    Reason::new(302, "Moved Temporarily")
}
pub fn too_many_hops() -> Reason {
    Reason::new(483, "Too Many Hops")
}
pub fn transferred() -> Reason {
    Reason::new(202, "Transferred")
}
pub fn endpoint_lost() -> Reason {
    Reason::new(408, "Remote endpoint lost")
}
pub fn shutting_down() -> Reason {
    Reason::new(503, "Server shutting down")
}
pub fn node_lost() -> Reason {
    Reason::new(503, "Node lost")
}
pub fn transfer_pending() -> Reason {
    Reason::new(491, "Request Pending")
}

/// A decline with the code the client gave: 486 Busy Here, 603 Decline, the SIP phrase for
/// other well-known codes.
pub fn declined(code: u16) -> Reason {
    let text = match code {
        486 => "Busy Here",
        603 => "Decline",
        600 => "Busy Everywhere",
        604 => "Does Not Exist Anywhere",
        606 => "Not Acceptable",
        480 => "Temporarily Unavailable",
        404 => "Not Found",
        403 => "Forbidden",
        500 => "Server Internal Error",
        _ => "Declined",
    };
    Reason::new(code, text)
}

/// The caller's final answer once every fork is gone (RFC 3261 §16.7, as the contract words
/// it): a 6xx if any, else the lowest class, and within a class a decline beats 480.
pub fn best_final(codes: &[u16]) -> Reason {
    let best = codes.iter().copied().min_by_key(|&c| {
        let class = c / 100;
        let six = if class == 6 { 0 } else { 1 };
        (six, class, u16::from(c == 480))
    });
    match best {
        Some(480) | None => temporarily_unavailable(),
        Some(c) => declined(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_final_prefers_6xx_then_lowest_class_then_decline_over_480() {
        assert_eq!(best_final(&[480, 486, 603]).code, 603);
        assert_eq!(best_final(&[480, 486]).code, 486);
        assert_eq!(best_final(&[486, 480]).code, 486);
        assert_eq!(best_final(&[500, 480]).code, 480);
        assert_eq!(best_final(&[500, 503]).code, 500);
        assert_eq!(best_final(&[]).code, 480);
    }
}
