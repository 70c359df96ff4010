//! Follows the placement tree with the file system notifier.
