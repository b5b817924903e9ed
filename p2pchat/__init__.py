"""p2pchat: a self-hostable secure chat system on Twisted."""
