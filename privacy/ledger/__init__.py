"""The signed, hash-chained privacy ledger: entries, an institution's chain, the consortium's."""
