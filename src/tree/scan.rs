//! Reads a whole placement tree into a [`Snapshot`](super::Snapshot).
