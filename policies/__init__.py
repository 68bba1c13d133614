"""Policies decide what to do about findings: rules, budgets, escalation, actions.

Empty until the controller lands (issue #4). It will never import ``probes`` or any
client library; ``supervisor`` hands it findings and carries out what it decides.
"""
