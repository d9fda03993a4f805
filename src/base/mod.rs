//! The floor every room stands on, importing nothing else of the crate: validated ids,
//! injected time, the sharded locks every in-memory map uses, the count-sized hash table
//! the index's maps are, notify-then-check waiting, and giving the allocator's freed pages
//! back.

pub mod alloc;
pub mod clock;
pub mod id;
pub(crate) mod shard;
pub(crate) mod table;
pub(crate) mod wait;
