-- Every later script runs in this database, with the extension created once.
CREATE EXTENSION bussig;
SELECT extname, extversion IS NOT NULL AS has_version, extrelocatable FROM pg_extension WHERE extname = 'bussig';
-- Everything lives in schema bussig.
SELECT count(*) > 0 AS has_functions FROM pg_proc WHERE pronamespace = 'bussig'::regnamespace;
