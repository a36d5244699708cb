"""The auditor's checks: ledger verification, budget recomputation, report, attacks."""
