"""INPUT -> Sources with stable names -> checked, decoded and prepared pixels."""
