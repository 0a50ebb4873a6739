"""Access control: tokens, the policy middleware, the audit trail."""
