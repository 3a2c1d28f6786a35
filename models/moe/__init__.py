"""The Mixture-of-Experts feed-forward in four named parts: the router (`router`: scores, top-k,
selection bias), its losses (`balance`: load-balancing and z-loss over the chosen scope), the token
dispatcher protocol with the one-rank `LocalDispatcher` (`dispatch`), the grouped experts and their
backends (`experts`), put together by `MoELayer` (`layer`). Plain torch: processes are parallel/'s."""
