-- deploy/compose.yaml only: the backend's connection table, empty, as its ORM names it
-- (the optional columns authType, encryptedRefreshToken, imapSecurity may be added).
-- Passwords are stored encrypted: `trio-idle encrypt` makes the "encryptedPassword" value.
CREATE TABLE IF NOT EXISTS "MailConnection" (
  id text PRIMARY KEY,
  "userId" text,
  email text NOT NULL,
  "imapHost" text NOT NULL,
  "imapPort" integer NOT NULL,
  "imapUser" text,
  "encryptedPassword" text NOT NULL,
  "isActive" boolean NOT NULL DEFAULT true
);
