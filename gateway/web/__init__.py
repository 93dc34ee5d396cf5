"""Pages the gateway serves to people: the pricing table."""
