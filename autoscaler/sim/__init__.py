"""The policy lab: replay traffic traces through the real scaling policy."""
