//! Console answers, read in tests: a handler's reply as the text an
//! operator would see.

use weir_host::Reply;

/// The text of a reply the test expects to succeed; an error reply fails
/// the test with its message.
pub fn text(reply: Reply) -> String {
    match reply {
        Reply::Text(t) => t,
        Reply::Error(e) => panic!("error reply: {e}"),
    }
}
