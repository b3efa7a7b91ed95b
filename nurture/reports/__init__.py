"""Results: what each journey achieved (entries, step reach, messages, conversions, experiments),
counted from the database, with the statistics of its experiments."""
