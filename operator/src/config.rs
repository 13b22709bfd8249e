//! Placeholder: owned by the config-rendering engineer (issue 5).
