//! Live QEMU oracle tests.
