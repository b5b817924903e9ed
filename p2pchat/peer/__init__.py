"""The peer: console, messenger, direct links, history."""
