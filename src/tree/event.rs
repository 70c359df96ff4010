//! Classifies file system paths inside the tree into [`TreeEvent`](super::TreeEvent)s.
