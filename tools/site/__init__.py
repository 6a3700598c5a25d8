"""The site operator's tools: the site key, enrolment, revocation (docs/security-model.md)."""
