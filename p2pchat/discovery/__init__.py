"""The discovery server: accounts, presence, blocks, relay and mailbox."""
