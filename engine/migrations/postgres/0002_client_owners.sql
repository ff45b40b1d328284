-- Server side: who owns each yrs client id. A client id belongs to the first writer (a token's
-- user) that uses it, and only that writer's pushes may carry new structs under it: structs of
-- one client id are identified by (client id, clock) alone, so a second writer under the same id
-- makes yrs drop one of them. Shared by every instance on the store, so all of them agree.
CREATE TABLE client_owners (
    client_id BIGINT PRIMARY KEY,
    owner     TEXT NOT NULL
);
