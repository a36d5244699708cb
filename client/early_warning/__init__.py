"""Early warning at the institution: scoring, indicators, reasons, intervention rules, the
advisor store and report. Everything here runs on the node; nothing leaves it."""
