//! Size hints of bodies that start with bytes already read.

use http_body::SizeHint;

/// The size hint of `read` bytes already in hand followed by a body whose
/// hint is `rest` (`None`: nothing follows).
pub(crate) fn after_read(rest: Option<SizeHint>, read: u64) -> SizeHint {
    let mut hint = rest.unwrap_or_else(|| SizeHint::with_exact(0));
    // Raise the upper bound first: `set_lower` panics above the upper bound.
    if let Some(upper) = hint.upper() {
        hint.set_upper(upper.saturating_add(read));
    }
    hint.set_lower(hint.lower().saturating_add(read));
    hint
}
