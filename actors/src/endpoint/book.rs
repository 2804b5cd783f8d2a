//! An endpoint's book of calls: the calls it holds, those whose legs live on other nodes, the
//! conversations they are in, and the calls lately ended. Made on first use, and read as an
//! empty book until then.
//!
//! Most endpoints hold no call for most of their life, and these maps' headers (about 150
//! bytes) inline in the endpoint put every endpoint's task into the allocator's next 128-byte
//! class. Boxed on first write instead, an idle endpoint pays 8 bytes for them.

use actix::Addr;
use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::LazyLock;

use super::remote::RemoteCall;
use crate::call::conversation::Conversation;
use crate::ids::IdMap;
use crate::route::LegRef;

#[derive(Default)]
pub(super) struct Book {
    pub(super) calls: IdMap<String, (LegRef, String)>,
    /// Cluster: calls of this endpoint whose legs live on other nodes.
    pub(super) remote_calls: IdMap<String, RemoteCall>,
    /// Calls that ended lately, and whether elsewhere (see `REMEMBERED_ENDED_CALLS`).
    pub(super) ended: VecDeque<(String, bool)>,
    pub(super) conversations: IdMap<String, (Addr<Conversation>, usize)>,
}

/// What an endpoint that never held a call reads.
static EMPTY: LazyLock<Book> = LazyLock::new(Book::default);

/// A [`Book`] made on the first write (`DerefMut`); read as empty until then. Write only where
/// something is to be written: a write on an empty book allocates it.
#[derive(Default)]
pub(super) struct LazyBook(Option<Box<Book>>);

impl LazyBook {
    /// The book, if it was ever written.
    pub(super) fn written(&mut self) -> Option<&mut Book> {
        self.0.as_deref_mut()
    }
}

impl Deref for LazyBook {
    type Target = Book;

    fn deref(&self) -> &Book {
        // A `match`, not `unwrap_or(&EMPTY)`: that would look at the `LazyLock` on every read.
        match self.0.as_deref() {
            Some(book) => book,
            None => &EMPTY,
        }
    }
}

impl DerefMut for LazyBook {
    fn deref_mut(&mut self) -> &mut Book {
        self.0.get_or_insert_with(Box::default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unwritten_book_reads_empty_and_costs_a_pointer() {
        let mut book = LazyBook::default();
        assert!(book.calls.is_empty() && book.ended.is_empty());
        assert!(book.0.is_none(), "reading does not make the book");
        book.ended.push_back(("c".into(), false));
        assert_eq!(book.ended.len(), 1);
        assert_eq!(std::mem::size_of::<LazyBook>(), 8);
    }

    /// The endpoint's task is paid by every idle endpoint, in tokio's 128-byte steps: the
    /// actor's future at 488 bytes puts it in 640 (632 bytes, with the book inline, put it in
    /// 768). A field added to `Endpoint` that moves it past this bound costs 128 bytes per
    /// endpoint: box it, or make room.
    #[test]
    fn the_endpoints_task_stays_in_its_size_class() {
        use actix::dev::ContextFut;
        let size = std::mem::size_of::<
            ContextFut<super::super::Endpoint, actix::Context<super::super::Endpoint>>,
        >();
        assert!(size <= 512, "the endpoint's future takes {size} bytes");
    }
}
