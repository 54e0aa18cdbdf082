"""The shipped benchmark prompt set (prompts.jsonl), a package so it installs with the wheel."""
