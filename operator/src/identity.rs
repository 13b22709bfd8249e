//! Placeholder: owned by the identity engineer (issue 4).
