//! The lab harness shared by the end-to-end tests.
