/** Where the bundled model lives (the default of every command and of MaceEngine). */
export const BUNDLED_MODEL = new URL("../../models/stories260K", import.meta.url).pathname;
