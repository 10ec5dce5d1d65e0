"""What every floor uses: the project's error types, output paths and atomic writes, content
digests, and the collectives that do nothing in one process."""
