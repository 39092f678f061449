"""Per-sequence measures: scoring (one forward), extraction (EL_n), the band and statuses, privacy AUCs."""
