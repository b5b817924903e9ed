from twisted.application.service import ServiceMaker

p2pdiscovery = ServiceMaker(
    "p2pchat discovery server", "p2pchat.discovery.tap",
    "p2pchat discovery server: accounts, presence, blocks, relay, mailbox", "p2pdiscovery")
p2ppeer = ServiceMaker(
    "p2pchat peer", "p2pchat.peer.tap",
    "p2pchat peer: console chat with direct TLS links", "p2ppeer")
